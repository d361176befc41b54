import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.errors import CheckpointError, StorageError, WeightsError
from dskd_ray.model.checkpoint import (
    V1_MODEL_ID_FIELDS,
    V3_MODEL_ID_FIELDS,
    V4_DEFAULTS,
    V4_MODEL_ID_FIELDS,
    Threshold,
    _content_hash,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from dskd_ray.model.checkpoint_header import model_identity
from dskd_ray.model.network import DSKD


def test_round_trip_rebuilds_the_same_model(tmp_path: Path, tiny_config: DSKDConfig) -> None:
    model = DSKD(tiny_config)
    ckpt = make_checkpoint(model, Threshold(0.5, "quantile", 1.0, [0.1, 0.2, 0.5]))
    save_checkpoint(ckpt, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == tiny_config
    assert loaded.threshold is not None and loaded.threshold.value == 0.5
    assert loaded.model_id == ckpt.model_id
    assert loaded.meta["versions"]["torch"] == torch.__version__
    rebuilt = loaded.build_model()
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(x), rebuilt(x)
    for key in a:
        for fa, fb in zip(a[key], b[key], strict=True):
            assert torch.equal(fa, fb)


def test_model_id_changes_with_weights(tiny_config: DSKDConfig) -> None:
    model = DSKD(tiny_config)
    first = make_checkpoint(model).model_id
    with torch.no_grad():
        next(model.student_parameters().__iter__()).add_(1.0)
    assert make_checkpoint(model).model_id != first


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path: Path, tiny_config: DSKDConfig) -> None:
    save_checkpoint(make_checkpoint(DSKD(tiny_config)), tmp_path / "m.pt")
    blob = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "half.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dskd_ray"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_flipped_bit_in_the_weights_is_refused_on_load(
    tmp_path: Path, tiny_config: DSKDConfig
) -> None:
    """A checkpoint with one exponent bit flipped in each weight tensor used to load silently,
    score NaN under the good model's id, and so block that model from scoring again."""
    good = make_checkpoint(DSKD(tiny_config))
    save_checkpoint(good, tmp_path / "good.pt")
    payload = torch.load(tmp_path / "good.pt", weights_only=True)
    flipped = 0
    for tensor in payload["state_dict"].values():
        if tensor.dtype == torch.float32 and tensor.numel():
            tensor.view(torch.int32).view(-1)[0] ^= 1 << 30  # the exponent's top bit
            flipped += 1
    assert flipped > 10
    torch.save(payload, tmp_path / "flipped.pt")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / "flipped.pt")
    message = str(refused.value)
    assert "corrupt" in message and f"stored {good.network_id}, recomputed " in message
    assert "\n" not in message
    assert load_checkpoint(tmp_path / "good.pt").model_id == good.model_id  # the good one loads


def _flip_exponent_bit(value: float) -> float:
    """The float with the top bit of its exponent flipped, as one bit rotting on disk."""
    (bits,) = struct.unpack("<Q", struct.pack("<d", value))
    return struct.unpack("<d", struct.pack("<Q", bits ^ (1 << 62)))[0]


def test_the_model_id_covers_the_threshold(tiny_config: DSKDConfig) -> None:
    """Two calibrations of the same weights are two models: their verdicts differ."""
    model = DSKD(tiny_config)
    a = make_checkpoint(model, Threshold(0.5, "quantile", 1.0, [0.1, 0.5]))
    b = make_checkpoint(model, Threshold(0.3, "quantile", 0.5, [0.1, 0.5]))
    assert a.network_id == b.network_id and a.model_id != b.model_id
    assert make_checkpoint(model).model_id not in (a.model_id, b.model_id)
    b.threshold = a.threshold  # the id follows what the checkpoint holds
    assert b.model_id == a.model_id


@pytest.mark.parametrize("written_as", ["current", "format 6"])
@pytest.mark.parametrize(
    "damage, expected",
    [
        ("flip", "threshold"),
        ("nan", "not a finite number"),
        ("text", "not a finite number"),
        ("scores", "held-out scores are not finite"),
    ],
)
def test_a_damaged_threshold_is_refused_in_one_line(
    tmp_path: Path, tiny_config: DSKDConfig, written_as: str, damage: str, expected: str
) -> None:
    """A flipped exponent bit used to give a threshold of 1.67e39 (every image normal, exit 0),
    a NaN every image normal, a string a numpy traceback. A current file's id covers its
    threshold; a file from before that is checked against its held-out scores."""
    scores = [0.2, 0.4, 0.5, 0.7]
    good = make_checkpoint(DSKD(tiny_config), Threshold(0.7, "quantile", 1.0, scores))
    save_checkpoint(good, tmp_path / "good.pt")
    payload = torch.load(tmp_path / "good.pt", weights_only=True)
    if written_as == "format 6":  # its stated id was the network's alone
        meta = json.loads(payload["meta"])
        meta["model_id"] = meta.pop("network_id")
        payload = {**payload, "format": "dskd_ray.checkpoint/6", "meta": json.dumps(meta)}
        torch.save(payload, tmp_path / "v6.pt")
        assert load_checkpoint(tmp_path / "v6.pt").model_id == good.model_id
    threshold = dict(payload["threshold"])
    if damage == "flip":
        threshold["value"] = _flip_exponent_bit(threshold["value"])
        assert threshold["value"] > 1e300
    elif damage == "nan":
        threshold["value"] = float("nan")
    elif damage == "text":
        threshold["value"] = "0.7"
    else:
        threshold["normal_scores"] = [*scores[:-1], float("inf")]
    torch.save({**payload, "threshold": threshold}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=expected) as refused:
        load_checkpoint(tmp_path / "bad.pt")
    assert "corrupt" in str(refused.value) and "\n" not in str(refused.value)


def test_any_bit_of_a_current_threshold_is_covered_by_the_id(
    tmp_path: Path, tiny_config: DSKDConfig
) -> None:
    """The lowest mantissa bit: too small for the quantile check, not for the model id."""
    good = make_checkpoint(DSKD(tiny_config), Threshold(0.7, "quantile", 1.0, [0.2, 0.7]))
    save_checkpoint(good, tmp_path / "good.pt")
    payload = torch.load(tmp_path / "good.pt", weights_only=True)
    threshold = {**payload["threshold"], "value": float(np.nextafter(0.7, 1.0))}
    torch.save({**payload, "threshold": threshold}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="threshold does not match its model id"):
        load_checkpoint(tmp_path / "bad.pt")


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path("/tmp/dskd-evil-was-here").touch, ())


def test_loading_never_runs_pickled_code(tmp_path: Path) -> None:
    target = Path("/tmp/dskd-evil-was-here")
    target.unlink(missing_ok=True)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "dskd_ray.checkpoint/1", "x": _Evil()}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"format": "dskd_ray.checkpoint/4", "x": _Evil()}, tmp_path / "evil-zip.pt")
    with pytest.raises(CheckpointError, match="PyTorch could not read it"):
        load_checkpoint(tmp_path / "evil-zip.pt")
    assert not target.exists()


def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(tmp_path: Path) -> None:
    """An ONNX graph, an image, JSON, a pickle as --model: what it looks like, in one line, and
    no word of PyTorch's advice to load with weights_only=False (which runs pickled code)."""
    import io

    from PIL import Image

    onnx = b"\x08\x0e\x12\x07pytorch\x1a\x052.14:\x00"  # how a ModelProto starts
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    files = {
        "model.onnx": (onnx, "an ONNX file"),
        "exported.pt": (onnx, "an ONNX file"),  # by its bytes, whatever its name
        "photo.pt": (jpeg.getvalue(), "a JPEG image"),
        "config.json": (b'{"backbone": "resnet18"}', "JSON"),
        "model.pkl": (pickle.dumps({"state_dict": {}}), "a Python pickle"),
        "empty.pt": (b"", "an empty file"),
        "notes.pt": (b"trained on line 3\n", "a text file"),
    }
    for name, (data, kind) in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(tmp_path / name)
        assert str(refused.value) == (
            f"{tmp_path / name} is not a dskd_ray checkpoint (this looks like {kind})"
        )
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)))
    with pytest.raises(CheckpointError, match=r"noise.pt is not a dskd_ray checkpoint \(not a"):
        load_checkpoint(tmp_path / "noise.pt")


def test_failed_save_leaves_the_previous_checkpoint(
    tmp_path: Path, tiny_config: DSKDConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.pt"
    first = make_checkpoint(DSKD(tiny_config))
    save_checkpoint(first, path)
    before = path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(StorageError, match=f"{path}: disk full"):  # one line, naming the file
        save_checkpoint(make_checkpoint(DSKD(tiny_config.replace(seed=1))), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_teacher_weights_errors_never_fall_back_to_random(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        DSKD(DSKDConfig(teacher_weights=str(tmp_path / "nope.pth")))
    torch.save({"conv1.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        DSKD(DSKDConfig(teacher_weights=str(tmp_path / "wrong.pth")))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a PyTorch state dict"):
        DSKD(DSKDConfig(teacher_weights=str(tmp_path / "junk.pth")))


@pytest.mark.parametrize("pyramid", ["4-8-16", "8-16-32"])
def test_teacher_weights_from_a_state_dict_path(tmp_path: Path, pyramid: str) -> None:
    # The whole network's state dict, as torchvision saves it: the 8-16-32 trunk takes layer4 too.
    from torchvision.models import resnet18

    full = resnet18().state_dict()
    torch.save(full, tmp_path / "teacher.pth")
    config = DSKDConfig(memory="none", teacher_weights=str(tmp_path / "teacher.pth"), image_size=64)
    model = DSKD(config.replace(pyramid=pyramid))
    own = model.teacher.state_dict()
    assert ("layer4.0.conv1.weight" in own) == (pyramid == "8-16-32")
    for key, value in own.items():
        assert torch.equal(value, full[key]), key
    assert model.teacher_identity.startswith("sha256:")


# Joined in /5 with the memory, besides V4_DEFAULTS' fields: the bank's size and sampling.
MEMORY_SETTINGS = ("memory_size", "memory_sampling", "memory_weight")


def _as_v4_config(payload: dict) -> dict:
    """The config of a /5 payload as /4 and older wrote it: without the memory's fields and
    the students' switches."""
    return {
        k: v
        for k, v in payload["config"].items()
        if k not in V4_DEFAULTS and k not in MEMORY_SETTINGS
    }


def _as_format_1(payload: dict, with_baseline: bool) -> dict:
    """What dskd_ray wrote under checkpoint/1: `map_normalization` and `level_scales`."""
    config = _as_v4_config(payload)
    normalization = config.pop("level_normalization")
    config.pop("score_top_k")
    config["map_normalization"] = "normal" if normalization == "mean" else "none"
    state = dict(payload["state_dict"])
    state.pop("level_location")
    state["level_scales"] = state.pop("level_spread")
    state["map_baseline"] = state.pop("pixel_baseline")
    if not with_baseline:
        config.pop("map_baseline")
        state.pop("map_baseline")
    # /1 hashed the same way over its own fields.
    meta = json.loads(payload["meta"])
    meta["model_id"] = _content_hash(config, V1_MODEL_ID_FIELDS, state)
    return {
        **payload, "format": "dskd_ray.checkpoint/1", "config": config, "state_dict": state,
        "meta": json.dumps(meta),
    }  # fmt: skip


@pytest.mark.parametrize("with_baseline", [True, False])
def test_a_format_1_checkpoint_loads_and_scores_as_before(
    tmp_path: Path, tiny_config: DSKDConfig, with_baseline: bool
) -> None:
    config = tiny_config.replace(
        level_normalization="mean", map_baseline="mean" if with_baseline else "none"
    )
    model = DSKD(config).eval()
    with torch.no_grad():
        model.level_spread.copy_(torch.tensor([[0.5, 0.2, 0.1], [0.4, 0.3, 0.05]]))
        model.pixel_baseline.uniform_(0.5, 2.0)
    save_checkpoint(make_checkpoint(model), tmp_path / "v3.pt")
    payload = torch.load(tmp_path / "v3.pt", weights_only=True)
    torch.save(_as_format_1(payload, with_baseline), tmp_path / "v1.pt")

    old = load_checkpoint(tmp_path / "v1.pt")
    stated = json.loads(torch.load(tmp_path / "v1.pt", weights_only=True)["meta"])["model_id"]
    assert old.network_id == stated  # verified as /1 hashed it
    assert old.model_id == model_identity(stated, None)  # and joined with its threshold (/7)
    assert old.config.level_normalization == "mean"
    assert old.config.map_baseline == ("mean" if with_baseline else "none")
    x = torch.rand(2, 3, 64, 64)
    expected, expected_scores = model.predict(x)
    maps, scores = old.build_model().predict(x)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(scores, expected_scores)
    # A /1 checkpoint is verified too: one changed weight and it is refused.
    v1 = torch.load(tmp_path / "v1.pt", weights_only=True)
    key = next(k for k in v1["state_dict"] if k.endswith("weight"))
    v1["state_dict"][key] = v1["state_dict"][key] * 2
    torch.save(v1, tmp_path / "v1-bad.pt")
    with pytest.raises(CheckpointError, match="do not match the id they were saved with"):
        load_checkpoint(tmp_path / "v1-bad.pt")


def test_a_format_2_checkpoint_loads_keeps_its_id_and_scores_as_before(
    tmp_path: Path, tiny_config: DSKDConfig
) -> None:
    """/2 named the baseline buffer `map_baseline`, like the config field."""
    model = DSKD(tiny_config).eval()
    with torch.no_grad():
        model.pixel_baseline.uniform_(0.5, 2.0)
    save_checkpoint(make_checkpoint(model), tmp_path / "v3.pt")
    payload = torch.load(tmp_path / "v3.pt", weights_only=True)
    state = dict(payload["state_dict"])
    state["map_baseline"] = state.pop("pixel_baseline")
    config = {k: v for k, v in _as_v4_config(payload).items() if k not in ("tiled", "tile_overlap")}
    meta = json.loads(payload["meta"])
    meta["model_id"] = _content_hash(config, V3_MODEL_ID_FIELDS, state)
    v2 = {**payload, "format": "dskd_ray.checkpoint/2", "config": config, "state_dict": state}
    torch.save({**v2, "meta": json.dumps(meta)}, tmp_path / "v2.pt")

    old = load_checkpoint(tmp_path / "v2.pt")
    assert old.network_id == meta["model_id"]  # verified as /2 hashed it
    assert old.model_id == model_identity(meta["model_id"], None)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(old.build_model().predict(x), model.predict(x))
    state[next(k for k in state if k.endswith("weight"))] *= 2
    torch.save({**v2, "meta": json.dumps(meta)}, tmp_path / "v2-bad.pt")
    with pytest.raises(CheckpointError, match="do not match the id they were saved with"):
        load_checkpoint(tmp_path / "v2-bad.pt")


def test_a_format_3_checkpoint_loads_as_an_untiled_model_and_keeps_its_id(
    tmp_path: Path, tiny_config: DSKDConfig
) -> None:
    """/3 was written before tiling: no `tiled` in its config, nor in its id's fields."""
    save_checkpoint(make_checkpoint(DSKD(tiny_config)), tmp_path / "v4.pt")
    payload = torch.load(tmp_path / "v4.pt", weights_only=True)
    config = {k: v for k, v in _as_v4_config(payload).items() if k not in ("tiled", "tile_overlap")}
    meta = json.loads(payload["meta"])
    meta["model_id"] = _content_hash(config, V3_MODEL_ID_FIELDS, payload["state_dict"])
    v3 = {**payload, "format": "dskd_ray.checkpoint/3", "config": config}
    torch.save({**v3, "meta": json.dumps(meta)}, tmp_path / "v3.pt")
    old = load_checkpoint(tmp_path / "v3.pt")
    assert old.network_id == meta["model_id"] and not old.config.tiled
    assert meta["model_id"] != json.loads(payload["meta"])["model_id"]  # /4 hashes tiling too


def test_a_format_4_checkpoint_loads_with_the_old_students_and_keeps_its_id(
    tmp_path: Path, tiny_config: DSKDConfig
) -> None:
    """/4 was written before the students' switches: it trained and scores as their defaults."""
    model = DSKD(tiny_config).eval()
    save_checkpoint(make_checkpoint(model), tmp_path / "v5.pt")
    payload = torch.load(tmp_path / "v5.pt", weights_only=True)
    config = _as_v4_config(payload)
    meta = json.loads(payload["meta"])
    meta["model_id"] = _content_hash(config, V4_MODEL_ID_FIELDS, payload["state_dict"])
    v4 = {**payload, "format": "dskd_ray.checkpoint/4", "config": config}
    torch.save({**v4, "meta": json.dumps(meta)}, tmp_path / "v4.pt")
    old = load_checkpoint(tmp_path / "v4.pt")
    assert old.network_id == meta["model_id"]  # verified as /4 hashed it
    assert {k: getattr(old.config, k) for k in V4_DEFAULTS} == V4_DEFAULTS
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(old.build_model().predict(x), model.predict(x))
    v4["state_dict"] = dict(v4["state_dict"])
    key = next(k for k in v4["state_dict"] if k.endswith("weight"))
    v4["state_dict"][key] = v4["state_dict"][key] * 2
    torch.save({**v4, "meta": json.dumps(meta)}, tmp_path / "v4-bad.pt")
    with pytest.raises(CheckpointError, match="do not match the id they were saved with"):
        load_checkpoint(tmp_path / "v4-bad.pt")


def test_an_unknown_format_names_both_versions(tmp_path: Path, tiny_config: DSKDConfig) -> None:
    save_checkpoint(make_checkpoint(DSKD(tiny_config)), tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({**payload, "format": "dskd_ray.checkpoint/9"}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint/9.*reads dskd_ray\.checkpoint/7"):
        load_checkpoint(tmp_path / "future.pt")


def test_the_header_gives_the_model_id_without_torch_or_the_weights(
    tmp_path: Path, tiny_config: DSKDConfig
) -> None:
    """What a dry run reads (issue 24): the stated model id, from `data.pkl` alone; in a
    process that never imports torch or Ray."""
    import subprocess
    import sys

    from dskd_ray.model.checkpoint_header import read_model_id

    ckpt = make_checkpoint(DSKD(tiny_config))
    save_checkpoint(ckpt, tmp_path / "m.pt")
    assert read_model_id(str(tmp_path / "m.pt")) == ckpt.model_id
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    code = (
        "import sys; from dskd_ray.nightly.plan import dry_run; "
        f"s = dry_run({str(tmp_path / 'images')!r}, {str(tmp_path / 'm.pt')!r}, "
        f"{str(tmp_path / 'out')!r}); "
        "print(s.model_id, s.listed, [m for m in ('torch', 'ray') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == [ckpt.model_id, "1", "[]"], done.stderr
    # A header that names anything but tensors and settings is refused; nothing runs.
    target = Path("/tmp/dskd-evil-was-here")
    target.unlink(missing_ok=True)
    torch.save({"format": "dskd_ray.checkpoint/4", "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt is not a dskd_ray checkpoint"):
        read_model_id(str(tmp_path / "evil.pt"))
    assert not target.exists()
    (tmp_path / "model.onnx").write_bytes(b"\x08\x0e\x12\x07pytorch:\x00")
    with pytest.raises(CheckpointError, match=r"\(this looks like an ONNX file\)"):
        read_model_id(str(tmp_path / "model.onnx"))
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        read_model_id(str(tmp_path / "nope.pt"))

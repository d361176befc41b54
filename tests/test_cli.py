"""The `dskd` command as a user runs it: a real subprocess, real files."""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import interrupted, own_lines, write_textures

# A random teacher at 64² for one epoch: seconds, enough to exercise the command paths.
TINY_TRAIN = [
    "--teacher-weights",
    "random",
    "--image-size",
    "64",
    "--epochs",
    "1",
    "--batch-size",
    "4",
]


def dskd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_bad_flag_is_one_line_not_a_traceback() -> None:
    result = dskd("train", "somewhere", "--out", "m.pt", "--bogus")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "No such option: --bogus" in result.stderr and "Traceback" not in result.stderr


def test_bad_option_value_is_one_line(tmp_path: Path) -> None:
    write_textures(tmp_path / "imgs", 3)
    result = dskd(
        "train", str(tmp_path / "imgs"), "--out", str(tmp_path / "m.pt"), "--backbone", "vgg99"
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "dskd: error: backbone='vgg99' is not one of resnet18, wide_resnet50_2, "
        "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"
    )


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = dskd("train", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt"))
    assert result.returncode == 1
    assert "holds no images" in result.stderr and "Traceback" not in result.stderr


def test_train_evaluate_predict_round_trip(tmp_path: Path) -> None:
    cat = tmp_path / "data" / "tex"
    write_textures(cat / "train" / "good", 8)
    write_textures(cat / "test" / "good", 2, seed=5)
    bad = write_textures(cat / "test" / "spot", 2, seed=6)
    (cat / "ground_truth" / "spot").mkdir(parents=True)
    for p in bad:
        Image.new("L", (64, 64), 0).save(cat / "ground_truth" / "spot" / f"{p.stem}_mask.png")
        mask = Image.open(cat / "ground_truth" / "spot" / f"{p.stem}_mask.png")
        mask.paste(255, (20, 20, 30, 30))
        mask.save(cat / "ground_truth" / "spot" / f"{p.stem}_mask.png")
        img = Image.open(p).convert("RGB")
        img.paste((0, 0, 0), (20, 20, 30, 30))
        img.save(p)
    model = tmp_path / "m.pt"
    result = dskd(
        "train", str(cat), "--out", str(model), *TINY_TRAIN[:-3], "2", "--batch-size", "4"
    )
    assert result.returncode == 0, result.stderr
    assert "checkpoint:" in result.stdout and model.exists()
    # stdout is a pipe here, as in `dskd train … > train.log`: one plain line per epoch.
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], result.stdout
    assert all(
        re.search(r"loss \d+\.\d{4}, [\d.]+ images/s, elapsed \d+:\d\d, ETA ", line)
        for line in epochs
    )
    assert epochs[-1].endswith("ETA 0:00")

    result = dskd("evaluate", str(cat), "--model", str(model), "--json", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    assert "tex: scored 4/4 test images" in result.stdout
    table = json.loads((tmp_path / "m.json").read_text())
    assert set(table) == {"tex", "mean"}
    assert set(table["mean"]) == {"image_auroc", "pixel_auroc", "aupro", "f1_max"}
    assert all(isinstance(v, float) for v in table["tex"].values())
    assert "image AUROC" in result.stdout

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage")
    result = dskd(
        "predict",
        str(bad[0]),
        str(tmp_path / "corrupt.png"),
        "--model",
        str(model),
        "--out",
        str(tmp_path / "pred"),
    )
    assert result.returncode == 1  # one image failed: said, and the other still scored
    assert "corrupt.png" in result.stderr and "Traceback" not in result.stderr
    # The reason, as a scoring run's error row gives it; not Pillow's "<_io.BytesIO object …>".
    assert "corrupt.png: not a recognised image format\n" in result.stderr
    assert "BytesIO" not in result.stderr
    with open(tmp_path / "pred" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in rows] == [bad[0].name, "corrupt.png"]
    assert float(rows[0]["score"]) > 0 and rows[1]["error"]
    overlay = Image.open(rows[0]["overlay"])
    assert overlay.size == (64, 64) and overlay.mode == "RGB"


def test_evaluate_without_masks_gives_null_pixel_metrics(tmp_path: Path) -> None:
    cat = tmp_path / "tex"
    write_textures(cat / "train" / "good", 6)
    write_textures(cat / "test" / "good", 2, seed=5)
    write_textures(cat / "test" / "odd", 2, seed=9)
    model = tmp_path / "m.pt"
    assert dskd("train", str(cat), "--out", str(model), *TINY_TRAIN).returncode == 0
    result = dskd("evaluate", str(cat), "--model", str(model), "--json", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "m.json").read_text())["tex"]
    assert row["pixel_auroc"] is None and row["aupro"] is None
    assert isinstance(row["image_auroc"], float) and isinstance(row["f1_max"], float)


def test_bad_precision_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    write_textures(tmp_path / "imgs", 2)
    result = dskd(
        "score", str(tmp_path / "imgs"), "--model", str(tmp_path / "absent.pt"),
        "--out", str(tmp_path / "out"), "--precision", "fp16",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == "dskd: error: --precision 'fp16' is not one of fp32, bf16"
    assert not (tmp_path / "out").exists()


# --- every numeric flag checked before anything runs (issue 11) --------------------------------


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert all(w in result.stderr for w in words), result.stderr


def test_train_bad_device_is_one_line(tmp_path: Path) -> None:
    result = dskd("train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.pt"),
                  "--device", "foo")  # fmt: skip
    one_line_error(result, 2, "--device", "'foo'", "auto, cpu, cuda or cuda:N")


def test_tile_flags_that_cannot_go_together_are_one_line(tmp_path: Path) -> None:
    write_textures(tmp_path / "imgs", 3)
    train = ["train", str(tmp_path / "imgs"), "--out", str(tmp_path / "m.pt")]
    one_line_error(dskd(*train, "--tile", "128", "--image-size", "64"), 1, "--tile", "--image-size")
    one_line_error(dskd(*train, "--tile-overlap", "8"), 1, "--tile-overlap needs --tile")
    one_line_error(dskd(*train, "--tile", "64", "--tile-overlap", "40"), 1, "tile_overlap=40", "32")
    one_line_error(dskd(*train, "--tile", "100"), 1, "--tile 100", "multiple of 32")
    assert not (tmp_path / "m.pt").exists()


# The students' switches (docs/design.md §1, §3): flag → (value given, config field, value kept).
STUDENT_FLAGS = {
    "--loss-form": ("pixel", "loss_form", "pixel"),
    "--hard-mining": ("0.5", "hard_mining", 0.5),
    "--feature-norm": ("standardize", "feature_norm", "standardize"),
    "--distance": ("l2", "distance", "l2"),
    "--denoise": ("0.5", "denoise", 0.5),
    "--pyramid": ("8-16-32", "pyramid", "8-16-32"),
    "--encoder-student": ("resnet", "encoder_student", "resnet"),
    "--optimizer": ("sgd", "optimizer", "sgd"),
    "--weight-decay": ("0.001", "weight_decay", 0.001),
}


def test_train_flags_for_the_students_switches_reach_the_checkpoint(tmp_path: Path) -> None:
    from dskd_ray.model.checkpoint import load_checkpoint

    write_textures(tmp_path / "imgs", 4)
    flags = [a for flag, (value, _, _) in STUDENT_FLAGS.items() for a in (flag, value)]
    result = dskd("train", str(tmp_path / "imgs"), "--out", str(tmp_path / "m.pt"),
                  *TINY_TRAIN, *flags)  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = load_checkpoint(tmp_path / "m.pt").config
    assert {f: getattr(config, f) for _, f, _ in STUDENT_FLAGS.values()} == {
        f: kept for _, f, kept in STUDENT_FLAGS.values()
    }
    bad = dskd("train", str(tmp_path / "imgs"), "--out", str(tmp_path / "b.pt"),
               "--loss-form", "sum")  # fmt: skip
    one_line_error(bad, 1, "loss_form='sum' is not one of pixel, flat")
    assert not (tmp_path / "b.pt").exists()


def test_image_size_has_an_upper_bound_shown_in_help(tmp_path: Path) -> None:
    result = dskd("train", str(tmp_path), "--out", str(tmp_path / "m.pt"),
                  "--image-size", "100000")  # fmt: skip
    one_line_error(result, 2, "--image-size", "4096")
    help_text = " ".join(dskd("train", "--help").stdout.split())
    assert "64<=x<=4096" in help_text
    # Defaults read as values, not click's "(256)" for a string default.
    assert "[default: 256]" in help_text and "[default: 50]" in help_text
    assert "[default: (" not in help_text


SCORE_FLAGS = ["--rows-per-file", "--actors", "--actor-threads", "--batch-size"]


@pytest.mark.parametrize("flag", SCORE_FLAGS)
def test_score_zero_counts_are_refused_at_once(tmp_path: Path, flag: str) -> None:
    start = time.perf_counter()
    result = dskd("score", str(tmp_path / "nowhere"), "--model", str(tmp_path / "absent.pt"),
                  "--out", str(tmp_path / "out"), flag, "0")  # fmt: skip
    one_line_error(result, 2, flag, "greater than or equal to 1")
    assert time.perf_counter() - start < 20  # no Ray start, no listing
    assert not (tmp_path / "out").exists()


def test_score_help_shows_the_bounds() -> None:
    text = " ".join(dskd("score", "--help").stdout.split())
    for flag in SCORE_FLAGS:
        assert flag in text
    assert text.count("1<=x<=") >= len(SCORE_FLAGS)  # a floor and a ceiling each


def test_score_bad_device_is_checked_before_listing(tmp_path: Path) -> None:
    # INPUT does not exist either: the device error must come first, before any listing.
    result = dskd("score", str(tmp_path / "nowhere"), "--model", str(tmp_path / "absent.pt"),
                  "--out", str(tmp_path / "out"), "--device", "foo")  # fmt: skip
    one_line_error(result, 2, "--device", "'foo'")
    assert "does not exist" not in result.stderr


def test_score_output_equal_to_input_is_refused_whatever_its_spelling(tmp_path: Path) -> None:
    write_textures(tmp_path / "imgs", 2)
    os.symlink(tmp_path / "imgs", tmp_path / "alias")
    # One spelling here (each is a process start); tests/test_storage.py tries the others.
    result = dskd("score", str(tmp_path / "imgs"), "--model", str(tmp_path / "absent.pt"),
                  "--out", str(tmp_path / "alias") + "/")  # fmt: skip
    one_line_error(result, 1, "is INPUT itself")
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["000.png", "001.png"]


# --- storage that cannot be reached: one line naming the URI (issue 11) ------------------------


def refused_endpoint_env() -> dict[str, str]:
    from conftest import _free_port

    return {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",  # nothing listens there
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",  # botocore's own retries, under ours, only add time here
    }


def test_an_unreachable_object_store_is_one_line_from_every_command(tmp_path: Path) -> None:
    env = refused_endpoint_env()
    commands = {
        # The output is probed first: a night is not spent scoring into nowhere.
        "score": (["score", "s3://b/images/", "--model", "s3://b/m.pt", "--out", "s3://b/out/"],
                  "cannot write to the output s3://b/out/"),
        "train": (["train", "s3://b/data/tile", "--out", str(tmp_path / "m.pt")],
                  "s3://b/data/tile"),
        "evaluate": (["evaluate", "s3://b/data/tile", "--model", "s3://b/m.pt"],
                     "s3://b/data/tile"),
        "predict": (["predict", "s3://b/x.png", "--model", "s3://b/m.pt", "--out",
                     str(tmp_path / "pred")], "s3://b/m.pt"),
    }  # fmt: skip
    # Started together: each spends most of its time in retries, not on the CPU.
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dskd_ray.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for name, (args, _) in commands.items()
    }
    for name, proc in running.items():
        _, stderr = proc.communicate(timeout=300)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
        one_line_error(result, 1, commands[name][1], "127.0.0.1")
        assert stderr.startswith("dskd: error: "), (name, stderr)


def test_storage_failures_are_retried_within_a_bound_and_never_in_vain(tmp_path: Path) -> None:
    """Nested retries (ours × s3fs's × botocore's) made an endpoint that drops every
    connection take 200 s to report; no credentials were retried too. Now: the client's
    defaults, as a user has them (no AWS_MAX_ATTEMPTS), and the total bounded."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)

    def drop_every_connection() -> None:
        while True:
            try:
                server.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=drop_every_connection, daemon=True).start()
    env = {k: v for k, v in refused_endpoint_env().items() if k != "AWS_MAX_ATTEMPTS"}
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{server.getsockname()[1]}"
    score = ["score", "s3://b/images/", "--model", "s3://b/m.pt", "--out", "s3://b/out/", "-v"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dskd_ray.cli", *score], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    elapsed = time.perf_counter() - start
    server.close()
    # A close before or after the request arrives reads as closed or reset: either is one line.
    last = done.stderr.splitlines()[-1]
    assert done.returncode == 1 and last.startswith("dskd: error: "), done.stderr[-2000:]
    assert re.search(r"Connection was closed|Connection reset by peer", last), last
    assert elapsed < 100, elapsed  # 30 s of retries at most, and the start; it was 200 s

    no_keys = {
        k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    no_keys |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_CONFIG_FILE": str(tmp_path / "none")}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "dskd_ray.cli", *score], capture_output=True,
                          text=True, env=no_keys, timeout=600)  # fmt: skip
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == (
        "dskd: error: cannot write to the output s3://b/out/: Unable to locate credentials"
    )
    assert " retry " not in done.stderr  # -v logs every retry: there was none


def test_verbose_shows_the_traceback_behind_the_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "train", "s3://b/data/tile",
         "--out", str(tmp_path / "m.pt"), "-v"],
        capture_output=True, text=True, env=refused_endpoint_env(), timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("dskd: error: storage error on ")


# --- predict and evaluate on a broken model and an odd name (issue 11) -------------------------


def save_tiny_models(folder: Path) -> tuple[Path, Path]:
    """(good, nan): tiny random-teacher checkpoints; the second's students give NaN, and its
    model id matches those weights, so only its scores can tell."""
    import torch

    from dskd_ray.config import DSKDConfig
    from dskd_ray.model.checkpoint import Threshold, make_checkpoint, save_checkpoint
    from dskd_ray.model.network import DSKD

    torch.manual_seed(0)
    model = DSKD(DSKDConfig(memory="none", teacher_weights="random", image_size=64))
    threshold = Threshold(1.0, "quantile", 0.5, [])
    save_checkpoint(make_checkpoint(model, threshold), folder / "good.pt")
    with torch.no_grad():
        for p in model.student_parameters():
            p.fill_(float("nan"))
    save_checkpoint(make_checkpoint(model, threshold), folder / "nan.pt")
    return folder / "good.pt", folder / "nan.pt"


def test_predict_and_evaluate_say_so_on_nan_scores_and_odd_names(tmp_path: Path) -> None:
    good, nan = save_tiny_models(tmp_path)
    cat = tmp_path / "tex"
    write_textures(cat / "train" / "good", 2)
    write_textures(cat / "test" / "good", 2, seed=5)
    write_textures(cat / "test" / "odd", 2, seed=9)
    image = cat / "test" / "good" / "000.png"
    odd = os.fsencode(tmp_path) + b"/caf\xe9.png"  # not UTF-8: made through the bytes API
    with open(odd, "wb") as f:
        f.write(image.read_bytes())
    odd_arg = os.fsdecode(odd)

    result = dskd("predict", str(image), odd_arg, "--model", str(nan), "--out", str(tmp_path / "p"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("score not finite") == 2 and "nan normal" not in result.stdout
    with open(tmp_path / "p" / "scores.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["score"] for r in rows] == ["", ""] and all("not finite" in r["error"] for r in rows)
    assert rows[1]["image"] == f"{tmp_path}/caf\\xe9.png"  # escaped, not a crash

    escape = tmp_path / "\x1b[2Jwiped\nline.png"  # an ESC sequence and a newline in the name
    escape.write_bytes(image.read_bytes())
    result = dskd("predict", odd_arg, str(escape), "--model", str(good), "--out",
                  str(tmp_path / "q"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path}/caf\\xe9.png: " in result.stdout
    assert (tmp_path / "q" / "caf\\xe9_overlay.png").is_file()
    assert f"{tmp_path}/\\x1b[2Jwiped\\x0aline.png: " in result.stdout
    assert "\x1b" not in result.stdout and len(result.stdout.splitlines()) == 3

    result = dskd("evaluate", str(cat), "--model", str(nan))
    one_line_error(result, 1, "non-finite score on 4 of 4", "score not finite")


TEARDOWN_BOMB = """
import atexit, os, sys

class NativeTeardown:  # stands in for a C++ thread pool that aborts when torn down at exit
    def __del__(self):
        os.abort()

bomb = NativeTeardown()  # a global: destroyed in the interpreter's teardown, after every hook
hook_file = sys.argv[1]
sys.argv = ["dskd", *sys.argv[2:]]
import dskd_ray.cli.entry as cli

command = cli._main

def command_that_registers_a_hook():  # as a command starting a local Ray does
    atexit.register(lambda: open(hook_file, "w").write("ran"))
    command()

cli._main = command_that_registers_a_hook
cli.main()
"""


@pytest.mark.parametrize(
    ("args", "code"),
    [(["make-demo-data", "--help"], 0), (["train", "x", "--out", "m.pt", "--bogus"], 2)],
)
def test_the_exit_code_survives_a_teardown_that_aborts(
    tmp_path: Path, args: list[str], code: int
) -> None:
    """A run that has finished exits with its own code even if a native library would abort in
    the interpreter's teardown (Arrow's thread pools did, once in a while: exit -6 after a
    complete `dskd score --dry-run`); the exit hooks registered after `main` began still run."""
    script = tmp_path / "bomb.py"
    script.write_text(TEARDOWN_BOMB)
    hook = tmp_path / "hook-ran"
    done = subprocess.run(
        [sys.executable, str(script), str(hook), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == code, done.stderr
    assert hook.read_text() == "ran"


# --- Ctrl-C: exit 130 and one line, never 0 (issue 24) -----------------------------------------


def test_ctrl_c_during_training_exits_130_and_keeps_the_last_whole_epoch(tmp_path: Path) -> None:
    from dskd_ray.model.checkpoint import load_checkpoint

    write_textures(tmp_path / "imgs", 8)
    out = tmp_path / "m.pt"
    # The encoder student alone: the smallest model, whose epoch still takes a while.
    train = ["train", str(tmp_path / "imgs"), "--out", str(out), *TINY_TRAIN, "--epochs", "6",
             "--students", "se"]  # fmt: skip
    result = interrupted(train, lambda _: out.exists(), tmp_path)  # once epoch 1 is saved
    assert result.returncode == 130, result.stderr
    assert own_lines(result.stderr)[-1] == (
        f"dskd: interrupted; {out} holds the last whole epoch: the same command with --resume "
        "goes on"
    )
    assert "Traceback" not in result.stderr and "checkpoint:" not in result.stdout
    saved = load_checkpoint(out).training
    assert not saved.get("complete") and 1 <= saved["epoch"] < 6
    resumed = dskd(*train, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    done = load_checkpoint(out).training
    assert done["complete"] and done["resumed_at"] == [saved["epoch"]]


def test_ctrl_c_during_scoring_in_process_exits_130_and_commits_nothing(tmp_path: Path) -> None:
    good, _ = save_tiny_models(tmp_path)
    write_textures(tmp_path / "imgs", 48)
    out = tmp_path / "out"
    result = interrupted(
        ["score", str(tmp_path / "imgs"), "--model", str(good), "--out", str(out), "-v",
         "--batch-size", "4"],
        lambda err: "scoring 48 images in this process" in err, tmp_path,
    )  # fmt: skip
    assert result.returncode == 130, result.stderr
    assert own_lines(result.stderr)[-1] == "dskd: interrupted"
    assert "Traceback" not in result.stderr and "committed" not in result.stdout
    assert not (out / "_manifests").exists()


# --- an output that cannot be written: found before anything is listed (issue 24) ---------------


def test_an_output_that_cannot_be_written_is_one_line_before_listing(tmp_path: Path) -> None:
    """INPUT and the model do not exist either: the output is probed first, in the dry run too
    (the real run used to score every image, then fail writing)."""
    (tmp_path / "a-file").write_text("in the way")
    for out, cause in [
        ("/sys/dskd-out", "Operation not permitted: /sys/dskd-out"),
        (f"{tmp_path}/a-file/out", f"Not a directory: {tmp_path}/a-file/out"),
    ]:
        for dry in ([], ["--dry-run"]):
            result = dskd("score", str(tmp_path / "nowhere"), "--model", str(tmp_path / "absent.pt"),
                          "--out", out, *dry)  # fmt: skip
            one_line_error(result, 1, f"cannot write to the output {out}: {cause}")


def test_an_onnx_file_as_model_is_one_line_without_unsafe_advice(tmp_path: Path) -> None:
    (tmp_path / "washer.onnx").write_bytes(b"\x08\x0e\x12\x07pytorch:\x00")
    write_textures(tmp_path / "imgs", 1)
    result = dskd("predict", str(tmp_path / "imgs" / "000.png"), "--model",
                  str(tmp_path / "washer.onnx"), "--out", str(tmp_path / "pred"))  # fmt: skip
    one_line_error(result, 1, "washer.onnx is not a dskd_ray checkpoint (this looks like an ONNX")
    assert "weights_only" not in result.stderr


# --- what the model id did not cover, and misleading messages ----------------------------------


def _unfinished_and_damaged(folder: Path) -> tuple[Path, Path]:
    """(an interrupted run's checkpoint: memory knn, its bank not fitted yet; a finished one
    whose stored threshold had an exponent bit flipped)."""
    import torch

    from conftest import memory_config
    from dskd_ray.model.checkpoint import make_checkpoint, save_checkpoint
    from dskd_ray.model.network import DSKD

    torch.manual_seed(0)
    model = DSKD(memory_config(epochs=3))
    unfinished = make_checkpoint(model, None, {"epoch": 1, "history": []})
    save_checkpoint(unfinished, folder / "unfinished.pt")
    good, _ = save_tiny_models(folder)
    payload = torch.load(good, weights_only=True)
    payload["threshold"]["value"] = 1.67e39  # 1.0 with its exponent's top bit rotted
    torch.save(payload, folder / "flipped.pt")
    return folder / "unfinished.pt", folder / "flipped.pt"


def test_an_unfinished_or_damaged_checkpoint_is_one_line_on_every_command(tmp_path: Path) -> None:
    """An interrupted run's checkpoint ended predict and evaluate in a traceback ("the memory
    bank is empty"), was called damaged by score and printed torch.export's text on export; a
    flipped threshold bit read as a normal verdict, exit 0."""
    unfinished, flipped = _unfinished_and_damaged(tmp_path)
    cat = tmp_path / "tex"
    write_textures(cat / "train" / "good", 2)
    write_textures(cat / "test" / "good", 2, seed=5)
    image = str(cat / "test" / "good" / "000.png")
    for model, words in [
        (unfinished, ("unfinished training run (epoch 1 of 3", "--resume")),
        (flipped, ("is corrupt: its threshold", "copy it again or retrain")),
    ]:
        commands = {
            "predict": ["predict", image, "--model", str(model), "--out", str(tmp_path / "p")],
            "evaluate": ["evaluate", str(cat), "--model", str(model)],
            "score": ["score", str(cat / "test"), "--model", str(model), "--out",
                      str(tmp_path / "s")],
            "dry run": ["score", str(cat / "test"), "--model", str(model), "--out",
                        str(tmp_path / "s"), "--dry-run"],
            "export": ["export", str(model), "--out", str(tmp_path / "m.onnx")],
        }  # fmt: skip
        for name, args in commands.items():
            result = dskd(*args)
            one_line_error(result, 1, *words)
            assert "normal" not in result.stdout, name
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "s" / "_manifests").exists()


def test_count_flags_past_any_use_are_refused_before_anything_runs(tmp_path: Path) -> None:
    """`--top 99999999999999999999` was an OverflowError traceback; `--batch-size` that large
    started the night and failed in it."""
    huge = "99999999999999999999"
    write_textures(tmp_path / "imgs", 2)
    for args, flag in [
        (["results", str(tmp_path), "--top", huge], "--top"),
        (
            [
                "score",
                str(tmp_path / "imgs"),
                "--model",
                "m.pt",
                "--out",
                str(tmp_path / "o"),
                "--batch-size",
                huge,
            ],
            "--batch-size",
        ),  # fmt: skip
        (
            ["train", str(tmp_path / "imgs"), "--out", str(tmp_path / "m.pt"), "--seed", huge],
            "--seed",
        ),  # fmt: skip
        (
            [
                "train",
                str(tmp_path / "imgs"),
                "--out",
                str(tmp_path / "m.pt"),
                "--memory-size",
                huge,
            ],
            "--memory-size",
        ),  # fmt: skip
    ]:
        one_line_error(dskd(*args), 2, flag, "less than or equal to")
    assert not (tmp_path / "o").exists()


def test_options_the_model_would_not_use_are_refused(tmp_path: Path) -> None:
    """They were accepted in silence, and --memory-weight changed the model id for nothing;
    --memory-weight nan exited 1 where every other bad flag exits 2."""
    write_textures(tmp_path / "imgs", 2)
    train = ["train", str(tmp_path / "imgs"), "--out", str(tmp_path / "m.pt"), *TINY_TRAIN]
    for extra, flag, why in [
        (["--memory-weight", "nan"], "--memory-weight", "from 0 to 1"),
        (["--memory", "none", "--memory-weight", "0.3"], "--memory-weight", "no memory"),
        (["--memory", "none", "--memory-size", "10"], "--memory-size", "no memory"),
        (["--students", "none", "--memory-weight", "0.3"], "--memory-weight", "no students"),
        (["--students", "none", "--feature-norm", "standardize"], "--feature-norm", "no students"),
    ]:
        one_line_error(dskd(*train, *extra), 2, flag, why)
    assert not (tmp_path / "m.pt").exists()


def test_a_list_in_a_manifest_column_is_one_line(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dskd_ray.errors import DataError
    from dskd_ray.nightly.listing import read_manifest

    write_textures(tmp_path / "imgs", 1)
    uri = str(tmp_path / "imgs" / "000.png")
    pq.write_table(
        pa.table({"image_uri": [uri], "image_version": [["v1", "v2"]]}), tmp_path / "m.parquet"
    )
    with pytest.raises(DataError, match="column image_version holds list<"):
        read_manifest(str(tmp_path / "m.parquet"))
    good, _ = save_tiny_models(tmp_path)
    result = dskd("score", str(tmp_path / "m.parquet"), "--model", str(good), "--out",
                  str(tmp_path / "out"))  # fmt: skip
    one_line_error(result, 1, "column image_version holds list<", "not text")


def test_report_and_json_targets_are_checked_before_the_work(tmp_path: Path) -> None:
    """`--report` into a file failed after the table, replaced a user's index.html without a
    word and wrote into the scores folder itself; `evaluate --json DIR` failed after the whole
    evaluation."""
    good, _ = save_tiny_models(tmp_path)
    write_textures(tmp_path / "imgs", 3)
    out = tmp_path / "scores"
    assert dskd("score", str(tmp_path / "imgs"), "--model", str(good), "--out",
                str(out)).returncode == 0  # fmt: skip
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "index.html").write_text("<html><title>my page</title></html>")
    for report, words in [
        (tmp_path / "a-file", ("is a file, not a folder",)),
        (tmp_path / "mine", ("holds an index.html that dskd did not write",)),
        (out, ("inside the scores folder",)),
        (out / "gallery", ("inside the scores folder",)),
    ]:
        result = dskd("results", str(out), "--report", str(report))
        one_line_error(result, 1, *words)
        assert result.stdout == ""  # refused before the table
    assert (tmp_path / "mine" / "index.html").read_text().startswith("<html><title>my page")
    assert dskd("results", str(out), "--report", str(tmp_path / "g")).returncode == 0
    assert dskd("results", str(out), "--report", str(tmp_path / "g")).returncode == 0  # ours

    cat = tmp_path / "tex"
    write_textures(cat / "train" / "good", 2)
    write_textures(cat / "test" / "good", 2, seed=5)
    result = dskd("evaluate", str(cat), "--model", str(good), "--json", str(tmp_path))
    one_line_error(result, 1, "--json", "is a folder")
    assert result.stdout == ""


def test_results_rank_each_model_apart_and_say_why_since_chose_nothing(tmp_path: Path) -> None:
    """Two models' scores are on scales of their own: `--top` ranked them together and listed
    each image twice; `--since` after the last run said only "no committed runs"."""
    import torch

    from dskd_ray.config import DSKDConfig
    from dskd_ray.model.checkpoint import Threshold, make_checkpoint, save_checkpoint
    from dskd_ray.model.network import DSKD

    first, _ = save_tiny_models(tmp_path)
    torch.manual_seed(1)
    other = DSKD(DSKDConfig(memory="none", teacher_weights="random", image_size=64))
    save_checkpoint(make_checkpoint(other, Threshold(5.0, "quantile", 0.5, [])), tmp_path / "b.pt")
    write_textures(tmp_path / "imgs", 4)
    out = str(tmp_path / "scores")
    for model in (first, tmp_path / "b.pt"):
        assert dskd("score", str(tmp_path / "imgs"), "--model", str(model), "--out",
                    out).returncode == 0  # fmt: skip
    report = json.loads(dskd("results", out, "--json", "--top", "3").stdout)
    top = report["top"]
    models = [t["model_id"] for t in top]
    assert len(set(models)) == 2 and models == sorted(models)  # model after model
    for model in set(models):
        mine = [t for t in top if t["model_id"] == model]
        assert len(mine) == 3 == len({t["image_uri"] for t in mine})
        assert [t["score"] for t in mine] == sorted((t["score"] for t in mine), reverse=True)
    table = dskd("results", out, "--top", "2").stdout
    assert sum(line.startswith("model ") for line in table.splitlines()) == 2

    later = dskd("results", out, "--since", "2999-01-01")
    assert later.returncode == 0
    last = report["runs"][-1]["run_id"]
    assert f"started on 2999-01-01 or later (the latest, {last}, started " in later.stdout


def test_files_are_written_with_the_umask_mode_not_0600(tmp_path: Path) -> None:
    """Checkpoints, graphs and maps were 0600 whatever the umask: a temp file renamed."""
    script = (
        "import os, sys; os.umask(0o022)\n"
        "from dskd_ray.io.storage import write_object\n"
        "write_object(sys.argv[1] + '/a.bin', b'x', durable=True)\n"
        "os.umask(0o027)\n"
        "import importlib, dskd_ray.io.storage as s; importlib.reload(s)\n"
        "s.write_object(sys.argv[1] + '/b.bin', b'x')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o640
    good, _ = save_tiny_models(tmp_path)  # save_checkpoint, in this process's own umask
    mask = os.umask(0)
    os.umask(mask)
    assert good.stat().st_mode & 0o777 == 0o666 & ~mask

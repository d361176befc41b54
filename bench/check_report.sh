#!/usr/bin/env bash
# Open a `dskd evaluate … --report DIR` page in headless Chromium and check that every image on it
# loaded from disk and that the page asked the network for nothing.
#
#   bench/check_report.sh DIR [SCREENSHOT.png]
#
# Prints "OK images=N" and exits 0, or prints what failed and exits 1. Exit 2: bad usage or no
# DIR/index.html; exit 3: no Chromium binary (install Debian's: apt-get install -y chromium, or
# point CHROMIUM at one). With SCREENSHOT.png it also writes a screenshot of the page's top
# (window size from SCREENSHOT_SIZE, default 1400,2600).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 REPORT_DIR [SCREENSHOT.png]" >&2
  exit 2
fi
dir=$(cd "$1" 2>/dev/null && pwd) || { echo "check_report: no folder $1" >&2; exit 2; }
[[ -f $dir/index.html ]] || { echo "check_report: $dir has no index.html" >&2; exit 2; }
shot=${2:-}

browser=${CHROMIUM:-}
if [[ -z $browser ]]; then
  for name in chromium chromium-browser google-chrome; do
    browser=$(command -v "$name" || true)
    [[ -n $browser ]] && break
  done
fi
[[ -n $browser ]] || { echo "check_report: no chromium binary found (apt-get install -y chromium)" >&2; exit 3; }

profile=$(mktemp -d)
probe=$dir/.browser_check.html
trap 'rm -rf "$profile" "$probe"' EXIT

# The probe is the page with a script after it (HTML5 parsers move it into <body>). After the load
# event (which waits for every image) it records broken images and any non-file:// request.
cp "$dir/index.html" "$probe"
cat >>"$probe" <<'JS'
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var missing = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); })
    .map(function (img) { return img.getAttribute("src"); });
  var remote = performance.getEntriesByType("resource").map(function (e) { return e.name; })
    .filter(function (url) { return url.indexOf("file:") !== 0; });
  var verdict = missing.length || remote.length
    ? "FAIL images=" + images.length + " missing=[" + missing.join(" ") + "] remote=[" + remote.join(" ") + "]"
    : "OK images=" + images.length;
  document.body.setAttribute("data-report-check", verdict);
});
</script>
JS

flags=(
  --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
  --disable-background-networking --disable-component-update --disable-sync
  --user-data-dir="$profile"
)
dom=$(timeout 180 "$browser" "${flags[@]}" --virtual-time-budget=15000 --dump-dom \
  "file://$probe" 2>/dev/null) || { echo "check_report: chromium failed or timed out" >&2; exit 1; }
verdict=$(grep -o 'data-report-check="[^"]*"' <<<"$dom" | head -n 1 | sed 's/^data-report-check="//; s/"$//')
if [[ -z $verdict ]]; then
  echo "check_report: the page never finished loading (no verdict in the DOM)" >&2
  exit 1
fi
echo "$verdict"

if [[ -n $shot ]]; then
  rm -rf "$profile" && mkdir -p "$profile"
  timeout 180 "$browser" "${flags[@]}" --hide-scrollbars --window-size="${SCREENSHOT_SIZE:-1400,2600}" \
    --virtual-time-budget=15000 --screenshot="$shot" "file://$dir/index.html" >/dev/null 2>&1 \
    || { echo "check_report: screenshot failed" >&2; exit 1; }
  echo "screenshot: $shot"
fi
[[ $verdict == OK* ]]

#!/usr/bin/env bash
# Fill a folder with what a bare CUDA machine (torch preinstalled, no network) needs
# to run scripts/gpu_check.sh: the wheels of the project's dependencies that such a
# machine lacks, the project's own wheel, and the Multi30k files.
#   scripts/gpu_bundle.sh [DIR]          (DIR defaults to gpu_bundle/, which git ignores)
# Run it where pip reaches PyPI. The dependencies are the ones installed in this
# environment (their versions pinned as installed here, the tested ones), less torch
# and less what the CUDA image already holds; binary wheels are fetched for CPython 3.12
# on manylinux x86-64, the CUDA machine's platform. Multi30k comes from
# $SEQ2SEQ_MULTI30K or ../shared/data/multi30k. The folder must stay under 64 MiB: the
# whole working tree that travels to the machine may not be larger.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/gpu_bundle}"
data="${SEQ2SEQ_MULTI30K:-$root/../shared/data/multi30k}"
limit_mib=64
python="${PYTHON:-python}"

fail() { echo "error: $*" >&2; exit 2; }

[ -d "$data" ] || fail "no Multi30k folder at $data (set SEQ2SEQ_MULTI30K)"
[ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ] && [ ! -f "$out/.gpu_bundle" ] \
    && fail "$out exists and is not a bundle folder; name an empty or new folder"
rm -rf "$out"
mkdir -p "$out/wheels" "$out/multi30k"
touch "$out/.gpu_bundle"

# name==version of every installed distribution the project (with its serve and test
# needs) pulls in, minus torch's family and what the CUDA image already holds.
"$python" - "$root" > "$out/requirements.txt" <<'PY'
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

# On the CUDA image already (its package list): installing them again would only
# risk replacing a build made for that machine.
IMAGE = """
torch triton numpy pyarrow pandas sentencepiece sacrebleu safetensors tqdm pyyaml psutil
httpx httpcore h11 anyio idna certifi sniffio prometheus-client xxhash fsspec
huggingface-hub hf-xet filelock requests urllib3 charset-normalizer packaging
typing-extensions jinja2 markupsafe click portalocker regex tabulate colorama lxml
aiohttp aiosignal aiohappyeyeballs frozenlist multidict yarl propcache attrs
matplotlib pillow python-dateutil six pytest pluggy iniconfig pygments
sympy mpmath networkx setuptools pip wheel uvloop pyparsing kiwisolver cycler
fonttools contourpy tzdata pytz shellingham rich typer markdown-it-py mdurl
""".split()


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


skip = {norm(n) for n in IMAGE} | {"torch"}
project = tomllib.loads((Path(sys.argv[1]) / "pyproject.toml").read_text())["project"]
wanted = [*project["dependencies"], *project["optional-dependencies"]["serve"], "pytest"]
seen: dict[str, str] = {}
todo = [Requirement(r) for r in wanted]
while todo:
    req = todo.pop()
    name = norm(req.name)
    if name in seen or name in skip or name.startswith("nvidia-"):
        continue
    try:
        dist = md.distribution(req.name)
    except md.PackageNotFoundError:
        sys.exit(f"error: {req.name} is not installed here; pip install -e . first")
    seen[name] = dist.version
    for text in dist.requires or []:
        sub = Requirement(text)
        if sub.marker is None or sub.marker.evaluate({"extra": "", "python_version": "3.12"}):
            todo.append(sub)
for name, version in sorted(seen.items()):
    print(f"{name}=={version}")
PY

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
while read -r pin; do
    [ -n "$pin" ] || continue
    # A pure or 3.12 binary wheel; a package published only as source is built here
    # into a wheel (only pure-Python ones are: a binary one would be this machine's).
    if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" \
            -d "$out/wheels" "$pin" 2>/dev/null; then
        "$python" -m pip wheel -q --no-deps -w "$out/wheels" "$pin" \
            || fail "could not fetch a wheel of $pin"
    fi
done < "$out/requirements.txt"
# Every wheel must install there: its tags checked against CPython 3.12 on glibc x86-64.
"$python" - "$out/wheels" <<'PY' || exit 2
import sys
from pathlib import Path

from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

platforms = [f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)]
platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
there = {*cpython_tags((3, 12), platforms=platforms), *compatible_tags((3, 12), "cp312", platforms)}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    if not set(parse_wheel_filename(wheel.name)[3]) & there:
        sys.exit(f"error: {wheel.name} would not install on CPython 3.12 x86-64")
PY
"$python" -m pip wheel -q --no-deps -w "$out/wheels" "$root"

cp "$data"/*.gz "$out/multi30k/"

size_kib="$(du -sk "$out" | cut -f1)"
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
    fail "$out holds $((size_kib / 1024)) MiB, over the $limit_mib MiB that can travel"
fi
echo "$out: $(ls "$out/wheels" | wc -l) wheels and $(ls "$out/multi30k" | wc -l) Multi30k files," \
     "$((size_kib / 1024)) MiB ($size_kib KiB) of $limit_mib MiB"

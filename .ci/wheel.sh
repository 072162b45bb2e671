#!/usr/bin/env bash
# The Python wheel as a user gets it: build it with maturin (pyproject.toml: the cuda feature),
# install it into a fresh virtual environment, and check that the `ema-tool` on that
# environment's PATH and `cargo run --release` print the same bytes for `--version` and for the
# README's first `ema` command (whose summary's time taken aside), and write the same file;
# that `python -m ema_tool` runs it and passes its exit status on; and that the man pages and
# completions are installed under share/.
#
# The wheel's binary is the release build of `cargo build --release --features cuda` in the
# same target directory (maturin runs that build), so `cargo run --release` after it only
# runs. The only network used is the package index, for maturin when it is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

venv() {
  if ! "$python" -m venv "$1" 2>/dev/null; then
    echo "== installing python3-venv"
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    "$python" -m venv "$1"
  fi
}

if command -v maturin >/dev/null; then
  maturin=maturin
else
  echo "== maturin from the package index, in a throwaway environment"
  venv "$work/build"
  "$work/build/bin/pip" install -q --disable-pip-version-check 'maturin>=1.5,<2'
  maturin=$work/build/bin/maturin
fi

echo "== $("$maturin" --version): maturin build --release"
"$maturin" build --release --locked --out "$work/wheels"
wheel=$(ls "$work"/wheels/ema_tool-*.whl)

echo "== installing $(basename "$wheel") into a fresh environment"
venv "$work/user"
"$work/user/bin/pip" install -q --disable-pip-version-check --no-index "$wheel"

# The README's first command, as written there; the globs expand as in the reader's shell.
readme_cmd=$(grep -m1 -o 'cargo run --release -- ema .*' README.md)
eval "set -- ${readme_cmd#cargo run --release -- }"
if [ $# -lt 3 ] || [ "${@: -2:1}" != -o ]; then
  echo "the README's first command is not \`cargo run --release -- ema ... -o FILE\`: $readme_cmd"
  exit 1
fi
out=${@: -1}
args=("${@:1:$#-2}")

wheel_path=$work/user/bin:$PATH
[ "$(PATH=$wheel_path command -v ema-tool)" = "$work/user/bin/ema-tool" ]

# capture DIR NAME COMMAND...: COMMAND's stdout and stderr into DIR/NAME.{out,err}
capture() {
  mkdir -p "$1"
  "${@:3}" >"$1/$2.out" 2>"$1/$2.err"
}
# Both write the same output path (it may appear in what they print), moved away after each.
target=$work/$out
for side in wheel cargo; do
  if [ $side = wheel ]; then
    ema_tool=(env PATH="$wheel_path" ema-tool)
  else
    ema_tool=(cargo run --quiet --locked --release --)
  fi
  capture "$work/$side" version "${ema_tool[@]}" --version
  capture "$work/$side" ema "${ema_tool[@]}" "${args[@]}" -o "$target"
  mv "$target" "$work/$side/$out"
  capture "$work/$side" inspect "${ema_tool[@]}" inspect fixtures/convnet/iter_5.safetensors
done

echo "== ema-tool --version"
cat "$work/wheel/version.out"
grep -q '^cuda: yes' "$work/wheel/version.out" || { echo "the wheel's binary lacks cuda"; exit 1; }
echo "== ${readme_cmd/#cargo run --release --/ema-tool}"
cat "$work/wheel/ema.err"
# The summary on stderr ends with the time taken, the one thing that may differ.
for side in wheel cargo; do
  sed -i -E 's/ in [0-9]+\.[0-9]+ s$/ in (time) s/' "$work/$side/ema.err"
done
diff -r "$work/wheel" "$work/cargo"
echo "   the wheel's ema-tool and cargo run --release: the same $out, stdout and stderr"

echo "== python -m ema_tool inspect fixtures/convnet/iter_5.safetensors"
"$work/user/bin/python" -m ema_tool inspect fixtures/convnet/iter_5.safetensors >"$work/inspect.py"
cmp "$work/inspect.py" "$work/cargo/inspect.out"
head -3 "$work/inspect.py"
# The exit status comes through (2: a usage error).
set +e
"$work/user/bin/python" -m ema_tool --no-such-flag 2>/dev/null
status=$?
set -e
[ $status -eq 2 ] || { echo "python -m ema_tool --no-such-flag exited $status, not 2"; exit 1; }

echo "== man pages and completions under share/"
share=$work/user/share
for f in man/man1/ema-tool.1 man/man1/ema-tool-ema.1 bash-completion/completions/ema-tool \
  zsh/site-functions/_ema-tool fish/vendor_completions.d/ema-tool.fish; do
  [ -s "$share/$f" ] || { echo "missing: share/$f"; exit 1; }
done
cmp "$share/man/man1/ema-tool.1" man/ema-tool.1

echo "== the wheel checks took $((SECONDS - start)) s"

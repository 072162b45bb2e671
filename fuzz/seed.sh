#!/bin/sh
# Seeds the fuzz corpora from the fixtures: every PyTorch checkpoint for torch_zip, the
# data.pkl of each for pickle. Run from the repository root: sh fuzz/seed.sh
set -e
mkdir -p fuzz/corpus/torch_zip fuzz/corpus/pickle
find fixtures -name '*.pth' -o -name '*.pt' -o -name '*.ckpt' -o -name '*.pth.tar' -o -name '*.bin' |
while read -r f; do
    n=$(echo "$f" | tr '/' '_')
    cp "$f" "fuzz/corpus/torch_zip/$n"
    python3 -c "
import sys, zipfile
try:
    z = zipfile.ZipFile(sys.argv[1])
    p = [n for n in z.namelist() if n.endswith('data.pkl')][0]
    open(sys.argv[2], 'wb').write(z.read(p))
except Exception:
    pass
" "$f" "fuzz/corpus/pickle/$n.pkl"
done

# The legacy files, pickles and pickled modules (torch_legacy, module_state), the DCP
# metadata (dcp_metadata).
mkdir -p fuzz/corpus/torch_legacy fuzz/corpus/module_state fuzz/corpus/dcp_metadata
cp fixtures/formats/legacy/*.pt fixtures/formats/legacy/*.pth fixtures/formats/pickle/*.pkl \
    fixtures/formats/module/*.pkl fuzz/corpus/torch_legacy/
cp fixtures/formats/pickle/network-*.pkl fixtures/formats/module/*.pkl fuzz/corpus/module_state/
for f in fixtures/formats/module/*.pt fixtures/formats/layouts/*; do
    python3 -c "
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
p = [n for n in z.namelist() if n.endswith('data.pkl')][0]
open(sys.argv[2], 'wb').write(z.read(p))
" "$f" "fuzz/corpus/module_state/$(basename "$f").pkl" 2>/dev/null || true
done
i=0
find fixtures/dcp -name .metadata | while read -r f; do
    i=$((i + 1))
    cp "$f" "fuzz/corpus/dcp_metadata/$(echo "$f" | tr '/' '_')"
done

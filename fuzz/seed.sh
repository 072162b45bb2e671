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

#!/usr/bin/env python3
"""Caps a minimized corpus at a number of files, keeping the most coverage.

    trim_corpus.py <fuzz binary> <corpus dir> <max files>

libFuzzer's set-cover merge keeps every input that adds an edge; this asks the
binary for each input's coverage features (-features_dir) and keeps, greedily,
the inputs that add the most features not yet covered (smaller first on ties)
until <max files> are kept. The rest are deleted.
"""

import os
import struct
import subprocess
import sys
import tempfile


def main():
    binary, corpus, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    files = set(os.listdir(corpus))
    if len(files) <= limit:
        return
    with tempfile.TemporaryDirectory() as feat:
        subprocess.run(
            [binary, "-runs=0", "-use_counters=0", f"-features_dir={feat}", corpus],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sets = {}
        for name in os.listdir(feat):
            with open(os.path.join(feat, name), "rb") as f:
                data = f.read()
            sets[name] = set(struct.unpack(f"<{len(data) // 4}I", data))

    def size(name):
        return os.path.getsize(os.path.join(corpus, name))

    total = set().union(*sets.values())
    kept, covered = [], set()
    while sets and len(kept) < limit:
        best = max(sets, key=lambda n: (len(sets[n] - covered), -size(n)))
        if not sets[best] - covered:
            break
        covered |= sets.pop(best)
        kept.append(best)
    for name in files - set(kept):
        os.remove(os.path.join(corpus, name))
    print(f"{corpus}: kept {len(kept)} of {len(files)} inputs,", end=" ")
    print(f"{len(covered)} of {len(total)} features")


if __name__ == "__main__":
    main()

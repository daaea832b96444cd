#!/usr/bin/env python3
"""Real photographs for the benchmarks, from Debian wallpaper packages, with their licences.

    python scripts/get_photos.py                       # → data/photos/
    python scripts/get_photos.py --debs /path/to/debs  # use .deb files already downloaded

What it does, deterministically:

1. ``apt-get download`` the packages (in a temporary folder; no root needed) — or take the
   ``.deb`` files from ``--debs`` — and unpack them with ``dpkg-deb -x``.
2. Copy the photographs listed in :data:`PHOTOS` to ``OUT/originals/<package>/``. The lists
   were made by looking at every picture of these packages: the abstract, rendered and
   gradient wallpapers are left out, only real photographs are kept (36 in the three default
   packages, 1280–5312 px wide).
3. Record each file's package, package version, copyright holder and licence (from the
   package's ``usr/share/doc/PKG/copyright``, machine-readable DEP-5; plasma wallpapers also
   state a licence in their ``metadata.json``, recorded too) in ``OUT/manifest.json`` and
   ``OUT/LICENSES.md``.
4. Cut ``--crop-size``² tiles (default 1024) from every original at 1:1 pixel scale — no
   resampling: ``nx = W // S`` by ``ny = H // S`` non-overlapping tiles, the grid centred
   (margins ``(W − nx·S)//2`` and ``(H − ny·S)//2``), row by row — saved as PNG (lossless) in
   ``OUT/crops-<S>/<package>__<photo>__r<row>c<col>.png`` with the boxes in the manifest.
   The default packages give 119 tiles of 1024².

``cascade bench recon OUT/crops-1024 ...`` then benchmarks at 1024² with no resizing at all.
``OUT/unseen.csv`` lists the photographs no training run of the built-in codec sees (the held-out originals and
``scripts/samples/``), a manifest for benchmarks at any ``--size``.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# package → photographs in it (paths inside the package), checked by eye on contact sheets.
PHOTOS = {
    "mate-backgrounds": [f"usr/share/backgrounds/mate/nature/{n}.jpg" for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")],
    # Left out: analogpattern_by_Peter_Nerlich (a texture), umang_by_Abhishek_Mudgal (a gradient).
    "lomiri-wallpapers-16.04": [f"usr/share/backgrounds/{n}.jpg" for n in (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
        "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich",
        "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
        "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")],
    # The other 19 plasma wallpapers are drawings or renders.
    "plasma-workspace-wallpapers": [f"usr/share/wallpapers/{n}/contents/images/2560x1600.jpg" for n in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "Path", "summer_1am")],
}


def fail(msg: str) -> None:
    print(f"get_photos: {msg}", file=sys.stderr)
    raise SystemExit(1)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        fail(f"{cmd[0]} is not installed (this script needs Debian's apt-get and dpkg-deb)")
    except subprocess.CalledProcessError as e:
        fail(f"`{' '.join(cmd)}` failed: {e.stderr.strip().splitlines()[-1] if e.stderr.strip() else e}. "
             "Try `apt-get update` first, or pass --debs DIR with the .deb files.")
    return ""


def parse_copyright(text: str) -> list[dict[str, str]]:
    """Stanzas of a DEP-5 copyright file: dicts with ``Files`` (space-separated patterns), ``Copyright``, ``License``
    (first line only)."""
    stanzas, current, key = [], {}, None
    for line in text.splitlines() + [""]:
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key:
            if key in ("Files", "Copyright"):
                current[key] += " " + line.strip() if key == "Files" else "; " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    return stanzas


def licence_of(stanzas: list[dict[str, str]], path: str) -> dict[str, str]:
    """Licence and copyright of an installed ``path`` (last matching ``Files`` stanza; a pattern matches the path's
    tail, or its file name)."""
    found: dict[str, str] = {}
    name = path.rsplit("/", 1)[-1]
    for st in stanzas:
        patterns = st.get("Files", "").split()
        if any(p.startswith("debian/") for p in patterns) or "License" not in st:
            continue
        if any(p == "*" or fnmatch.fnmatch(path, "*/" + p) or fnmatch.fnmatch(name, p.rsplit("/", 1)[-1])
               for p in patterns):
            found = {"licence": st["License"].split()[0] if st["License"] else "", "copyright": st.get("Copyright", "")}
    return found


def _save_tiles(img: Image.Image, side: int, out: Path, folder: Path, prefix: str, **fields: object) -> list[dict]:
    """Every tile of the centred ``side``² grid of ``img`` as ``folder/<prefix>__r<row>c<col>.png``; returns their
    manifest entries (file relative to ``out``, ``fields``, box)."""
    from datasets_tools.crops import grid_tiles

    entries = []
    for tile in grid_tiles(img.width, img.height, side):
        path = folder / f"{prefix}__r{tile.row}c{tile.col}.png"
        img.crop(tile.box).save(path)
        entries.append({"file": str(path.relative_to(out)), **fields, "box": list(tile.box)})
    return entries


def _fresh_dir(folder: Path) -> Path:
    """``folder``, emptied (tiles of an earlier run with other settings must not linger)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _scaled_tiles(out: Path, records: list[dict], sides: list[int], scales: list[int]) -> list[dict]:
    """Tiles of every side in ``sides`` from each photograph resized to each short side in ``scales`` (PIL's
    antialiased bicubic), into ``out/<split>-<side>/``; returns their manifest entries."""
    from PIL import Image

    from codec.images import load_image

    found = []
    for side in sides:
        for split in ("train", "heldout"):
            _fresh_dir(out / f"{split}-{side}")
        for rec in records:
            img = load_image(out / rec["file"])
            stem = Path(rec["file"]).stem
            for short in scales:
                k = short / min(img.size)
                small = img.resize((round(img.width * k), round(img.height * k)), Image.BICUBIC, reducing_gap=3.0)
                found += _save_tiles(small, side, out, out / f"{rec['split']}-{side}",
                                     f"{rec['package']}__{stem}__s{short}", original=rec["file"], split=rec["split"],
                                     short_side=short)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "photos",
                    help="Output folder (default: data/photos in the repo, git-ignored).")
    ap.add_argument("--packages", nargs="+", default=list(PHOTOS), choices=list(PHOTOS),
                    help="Debian packages to take photos from (default: all known).")
    ap.add_argument("--debs", type=Path, default=None,
                    help="Folder with the packages' .deb files already downloaded (skips apt-get download).")
    ap.add_argument("--crop-size", type=int, default=1024, help="Side of the square tiles cut (0: no tiles).")
    ap.add_argument("--holdout", type=int, default=6,
                    help="Every HOLDOUT-th photograph (in the listing order above) is held out: its split is "
                         "'heldout' in the manifest and training never sees it (default: 6 → 6 of 36).")
    ap.add_argument("--scaled-tiles", type=int, nargs="*", default=[], metavar="SIDE",
                    help="Also cut SIDE² tiles from each photograph resized (antialiased) to every short side of "
                         "--scales, into OUT/<split>-<SIDE>/ (train-320/, heldout-256/ …): the mini codec's "
                         "training and held-out data. Default: none.")
    ap.add_argument("--scales", type=lambda v: [int(x) for x in v.split(",")], default=[320, 480, 720, 1080],
                    help="Short sides for --scaled-tiles, comma-separated (default: 320,480,720,1080).")
    args = ap.parse_args(argv)

    from PIL import Image

    from codec.images import load_image

    out = args.out
    originals = out / "originals"
    with tempfile.TemporaryDirectory(prefix="cascade-photos-") as tmp:
        tmp = Path(tmp)
        if args.debs:
            debs = {}
            for pkg in args.packages:
                found = sorted(args.debs.glob(f"{pkg}_*.deb"))
                if not found:
                    fail(f"no {pkg}_*.deb in {args.debs}")
                debs[pkg] = found[-1]
        else:
            print(f"apt-get download {' '.join(args.packages)}", file=sys.stderr)
            run(["apt-get", "download", *args.packages], cwd=tmp)
            debs = {pkg: sorted(tmp.glob(f"{pkg}_*.deb"))[-1] for pkg in args.packages}
        records = []
        for pkg, deb in debs.items():
            version = run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
            root = tmp / f"root-{pkg}"
            run(["dpkg-deb", "-x", str(deb), str(root)])
            stanzas = parse_copyright((root / "usr/share/doc" / pkg / "copyright").read_text(encoding="utf-8"))
            for rel in PHOTOS[pkg]:
                src = root / rel
                if not src.is_file():
                    fail(f"{rel} is not in {deb.name}; the package changed — update PHOTOS in {__file__}")
                lic = licence_of(stanzas, rel)
                if not lic.get("licence"):
                    fail(f"no licence for {rel} in {pkg}'s copyright file")
                name = src.parent.parent.parent.name + ".jpg" if pkg == "plasma-workspace-wallpapers" else src.name
                meta = src.parent.parent.parent / "metadata.json"
                if meta.is_file():
                    plugin = json.loads(meta.read_text(encoding="utf-8")).get("KPlugin", {})
                    lic["metadata_licence"] = plugin.get("License", "")
                    lic["author"] = ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
                dst = originals / pkg / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                with Image.open(dst) as im:
                    size = im.size
                split = "heldout" if args.holdout and len(records) % args.holdout == args.holdout - 1 else "train"
                records.append({"file": str(dst.relative_to(out)), "split": split, "package": pkg, "version": version,
                                "path_in_package": rel, "width": size[0], "height": size[1],
                                "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(), **lic})
    crops = []
    if args.crop_size:
        crop_dir = _fresh_dir(out / f"crops-{args.crop_size}")
        for rec in records:
            img = load_image(out / rec["file"])
            stem = Path(rec["file"]).stem
            crops += _save_tiles(img, args.crop_size, out, crop_dir, f"{rec['package']}__{stem}", original=rec["file"])
    scaled = _scaled_tiles(out, records, args.scaled_tiles, args.scales)
    manifest = {"about": "Photographs from Debian packages; licences from each package's DEP-5 copyright file. "
                         f"Tiles: non-overlapping {args.crop_size}² crops at 1:1 scale, centred grid, row by row.",
                "originals": records, "crops": crops, "scaled_tiles": scaled}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    # photographs no training run sees, whole, for benchmarks at any size: the held-out originals and the
    # repository's sample photos (scripts/samples/)
    unseen = [(Path(r["file"]).stem, r["file"]) for r in records if r["split"] == "heldout"]
    unseen += [(p.stem, str(p)) for p in sorted((ROOT / "scripts" / "samples").glob("*.jpg"))]
    (out / "unseen.csv").write_text("id,path\n" + "".join(f"{i},{f}\n" for i, f in unseen), encoding="utf-8")
    lines = ["# Photographs and their licences", "",
             "From Debian packages (downloaded with `apt-get download`, unpacked with `dpkg-deb -x`) by "
             "`scripts/get_photos.py`. Licence and copyright from each package's `usr/share/doc/PKG/copyright`. "
             + (f"`crops-{args.crop_size}/` holds {len(crops)} tiles cut from these files at 1:1 scale. "
                if args.crop_size else "")
             + (f"{len(scaled)} tiles of resized copies are in " + ", ".join(
                 f"`{split}-{side}/`" for side in args.scaled_tiles for split in ("train", "heldout")) + ". "
                if scaled else "")
             + "Tiles have the licences of their originals; `manifest.json` lists each tile's original, box and "
               "split (every --holdout-th photograph is held out).", "",
             "| file | package (version) | licence | copyright / author |", "|---|---|---|---|"]
    for r in records:
        extra = f" (metadata.json: {r['metadata_licence']})" if r.get("metadata_licence") else ""
        who = r.get("author") or r.get("copyright", "")
        lines.append(f"| {r['file']} | {r['package']} ({r['version']}) | {r['licence']}{extra} | {who} |")
    (out / "LICENSES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    held = sum(r["split"] == "heldout" for r in records)
    print(f"{len(records)} photographs ({held} held out) in {originals}, {len(crops)} tiles of {args.crop_size}² in "
          f"{out / f'crops-{args.crop_size}'}, {len(scaled)} scaled tiles; licences in {out / 'LICENSES.md'}; "
          f"{len(unseen)} photographs never trained on listed in {out / 'unseen.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bundle a trained model: copy it into Resources/Models and record it in models.json.

    python scripts/register_model.py MODEL.pt --name speckle2self-carotid-w16 --version 1 [--default]
        [--description "..."]

models.json holds each bundled model's file, version and SHA-256; the library verifies the
checksum before loading a bundled model. Add the new file to MODULE_MODEL_RESOURCES in
Speckle2Self/CMakeLists.txt (Testing/test_extension_static.py checks it).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))

from Speckle2SelfLib.engine.models import MANIFEST, MODELS_DIR, file_sha256, load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--default", action="store_true")
    parser.add_argument("--description", default="")
    args = parser.parse_args()
    meta = load_model(args.model).metadata          # refuses anything that is not a valid model
    target = MODELS_DIR / f"{args.name}-v{args.version}.pt"
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.model, target)
    entries = json.loads(MANIFEST.read_text())["models"] if MANIFEST.is_file() else []
    entries = [e for e in entries if e["file"] != target.name]
    if args.default:
        for e in entries:
            e["default"] = False
    entries.append({"name": args.name, "version": args.version, "file": target.name,
                    "sha256": file_sha256(target), "default": args.default or not entries,
                    "width": meta["width"], "description": args.description})
    MANIFEST.write_text(json.dumps({"models": entries}, indent=2) + "\n")
    print(f"bundled {target.relative_to(ROOT)} ({target.stat().st_size / 2**20:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

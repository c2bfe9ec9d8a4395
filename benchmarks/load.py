"""What loading backbone weights costs, and which part of it is pgpcl's checking.

``load_weights_file`` reads a weights file up to three times: a zip-format ``.pth`` has its CRC-32s checked
first (torch.load does not check them, so flipped bytes inside a tensor would load as wrong numbers), then
torch.load (or safetensors) reads the tensors, and the file's sha256 is taken for the results file. This
script times each part on a random ViT (timm, no pretrained weights), saved in both formats, medians of
``--repeats`` loads into a fresh model. The files were just written, so they are read from the page cache:
these are CPU costs, not disk reads.

    python benchmarks/load.py --models b
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import (
    MODELS,
    add_common_args,
    build_vit,
    comma_list,
    finish,
    int_at_least,
    med,
    run_main,
    setup,
    table,
    timed,
)


def parts(path: Path, model) -> dict[str, float]:
    from safetensors.torch import load_file

    from pgpcl.io import check_zip_checksums, safe_torch_load, sha256_file
    from pgpcl.models.weights import load_weights_file

    out = {"total": timed(lambda: load_weights_file(model, path)), "sha256": timed(lambda: sha256_file(path))}
    if path.suffix == ".pth":
        out["crc"] = timed(lambda: check_zip_checksums(path))
        out["read"] = timed(lambda: safe_torch_load(path)) - out["crc"]  # safe_torch_load checks the CRCs too
    else:
        out["crc"] = 0.0
        out["read"] = timed(lambda: load_file(str(path)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--models", type=comma_list(MODELS), default=["b"], help="ViT sizes, comma-separated")
    p.add_argument("--repeats", type=int_at_least(1), default=5)
    args = p.parse_args()
    mach = setup(args)
    import torch
    from safetensors.torch import save_file

    results, rows = [], []
    for size in args.models:
        vit = build_vit(size, img_size=224)
        sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            files = {"pth": Path(tmp) / "w.pth", "safetensors": Path(tmp) / "w.safetensors"}
            torch.save(sd, files["pth"])
            save_file(sd, str(files["safetensors"]))
            for fmt, path in files.items():
                runs = [parts(path, build_vit(size, img_size=224)) for _ in range(args.repeats)]
                m = {k: med(r[k] for r in runs) for k in runs[0]}
                mib = path.stat().st_size / 2**20
                results.append({"model": size, "format": fmt, "mib": mib, "runs": runs, "median": m})
                rows.append([size, fmt, f"{mib:.0f}", m["total"], m["crc"], m["read"], m["sha256"],
                             f"{100 * m['crc'] / m['total']:.0f}%"])
                print(f"done {size} {fmt}", flush=True)
    print(table(["model", "format", "MiB", "load_weights_file s", "CRC check s", "read s", "sha256 s",
                 "CRC share"], rows))
    notes = [f"medians of {args.repeats} loads into a fresh random model; files in the page cache",
             "read = safe_torch_load minus its CRC check (.pth), safetensors.torch.load_file (.safetensors)",
             "total includes checking keys and shapes and load_state_dict"]
    finish("load", args, mach, results, notes)


if __name__ == "__main__":
    run_main(main)

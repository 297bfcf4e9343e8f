"""Imports a PyTorch Equivariant Transformer checkpoint (torchmd-net, Frad, MolSpectra) without torch.

    python -m experiments.convert --from frad --ckpt frad_qm9.ckpt --out runs/frad_torch
    python -m experiments.finetune --config experiments/configs/finetune_qm9.py:homo \
        --workdir runs/ft_homo --config.init.checkpoint=runs/frad_torch <printed --config.model flags>

    # check against torch's own outputs (an npz from experiments/torch_reference.py):
    python -m experiments.convert --from frad --ckpt frad_qm9.ckpt --out runs/frad_torch \
        --check frad_qm9_reference.npz

    # a fine-tuned torch model, as a fine-tuning workdir that experiments.evaluate accepts:
    python -m experiments.convert --from frad --ckpt homo.ckpt --out runs/homo_torch \
        --finetune_config experiments/configs/finetune_qm9.py:homo
    python -m experiments.evaluate --workdir runs/homo_torch

A plain ``state_dict`` file carries no hyper-parameters: give ``--num_heads`` and
``--output_model`` (or ``--hparams`` with the run's ``hparams.yaml``). Every unmapped tensor,
missing parameter, shape mismatch or unsupported setting is reported; nothing is skipped.
See docs/models.md.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("from", None, ["torchmd-net", "frad", "molspectra"],
                  "Which codebase wrote the checkpoint.")
flags.DEFINE_string("ckpt", None, "A Lightning .ckpt or a torch.save'd state_dict (.pt).")
flags.DEFINE_string("out", None, "New directory for the mspec checkpoint.")
flags.DEFINE_integer("num_heads", None, "Attention heads (needed for a plain state_dict).")
flags.DEFINE_string("output_model", None, "The scalar head's type, 'Scalar' (plain state_dict).")
flags.DEFINE_string("hparams", None, "A YAML/JSON file of hyper-parameters (e.g. hparams.yaml) "
                    "completing or overriding the checkpoint's own.")
flags.DEFINE_string("check", None, "A reference .npz of torch's outputs on some molecules "
                    "(experiments/torch_reference.py; tests/data/golden_et/README.md): print the "
                    "relative errors of the converted model and fail above --check_tol.")
flags.DEFINE_float("check_tol", 1e-6, "Largest float64 relative error --check accepts "
                   "(float32: 100x, at least 1e-4).")
config_flags.DEFINE_config_file(
    "finetune_config", None,
    "Optional: an experiments/configs/finetune_*.py[:variant]; then --out is a fine-tuning "
    "workdir that experiments.evaluate accepts.", lock_config=False)
flags.mark_flags_as_required(["from", "ckpt", "out"])


def _hparams() -> dict:
    out = {}
    if FLAGS.hparams:
        with open(FLAGS.hparams) as f:
            text = f.read()
        if FLAGS.hparams.endswith(".json"):
            import json

            out.update(json.loads(text))
        else:
            import yaml

            out.update(yaml.safe_load(text) or {})
    if FLAGS.num_heads is not None:
        out["num_heads"] = FLAGS.num_heads
    if FLAGS.output_model is not None:
        out["output_model"] = FLAGS.output_model
    return out


def _check(converted) -> None:
    """Compares the converted model with torch's reference outputs; exits 1 above tolerance."""
    import numpy as np

    from mspec.io import parity, torch_et

    ref = dict(np.load(FLAGS.check))
    grads = {k[len("grad/"):]: v for k, v in ref.items() if k.startswith("grad/")}
    head = next((h for h in converted.model["heads"] if h != "noise"), "scalar")
    tree, unmapped = torch_et.to_tree(converted.variant, grads, head) if grads else (None, [])
    if unmapped:
        raise SystemExit(f"error: {FLAGS.check}: gradients of unknown parameters {unmapped}")
    try:
        errors = parity.compare(converted, ref, grads_tree=tree)
    except ValueError as e:
        raise SystemExit(f"error: {FLAGS.check}: {e}") from None
    tol64, tol32 = FLAGS.check_tol, max(1e-4, 100 * FLAGS.check_tol)
    bad = {k: e for k, e in errors.items() if e > (tol64 if k.startswith("float64") else tol32)}
    for k, e in errors.items():
        if not k.startswith("float64 grad["):
            print(f"  {k}: {e:.2e}")
    grad_errors = [e for k, e in errors.items() if k.startswith("float64 grad[")]
    if grad_errors:
        print(f"  float64 parameter gradients ({len(grad_errors)}): max {max(grad_errors):.2e}")
    if bad:
        raise SystemExit(f"error: {FLAGS.check}: above tolerance: {bad}")
    print(f"parity with {FLAGS.check}: ok (float64 <= {tol64:g}, float32 <= {tol32:g})")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from mspec.io import export, torch_et

    try:
        converted = torch_et.convert(FLAGS.ckpt, FLAGS["from"].value, _hparams())
        if FLAGS.check:  # before anything is written
            _check(converted)
        if FLAGS.finetune_config is not None:
            out = export.write_finetune_workdir(converted, FLAGS.out, FLAGS.finetune_config)
        else:
            out = export.write_pretrained(converted, FLAGS.out)
    except torch_et.ConversionError as e:
        raise SystemExit(f"error: {e}") from None
    m = converted.model
    print(f"converted {FLAGS.ckpt} ({converted.variant}): F={m['hidden']}, L={m['num_layers']}, "
          f"H={m['num_heads']}, K={m['num_rbf']}, cutoff {m['cutoff']} Å, per-layer norm "
          f"{m['interlayer_norm']}, vector norm {m['vector_norm']}, heads {list(m['heads'])}"
          + (", separate noise vectors" if m.get("separate_noise_vectors") else "")
          + (", learnable atomref prior" if m.get("prior", "none") != "none" else ""))
    print(f"standardisation: {converted.standardization['mean']} + "
          f"{converted.standardization['std']} x sum of atoms"
          + (", with atom references" if converted.standardization["atomref"] else ""))
    print(f"wrote {out}")
    if FLAGS.finetune_config is not None:
        print(f"evaluate: python -m experiments.evaluate --workdir {out}")
    else:
        print("fine-tune with: --config.init.checkpoint=" + out + " " + " ".join(export.model_flags(converted)))


if __name__ == "__main__":
    app.run(main)

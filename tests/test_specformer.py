"""SpecFormer and spectrum patching: token/mask counts, parameter count, masking, masked BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mspec import spectra
from mspec.models import count_params
from mspec.models.specformer import SpecFormer, make_specs

LENGTHS = dict(uv=701, ir=3501, raman=3501)


def official_specs(mask_ratio=0.1):
    return make_specs(
        ("uv", "ir", "raman"),
        LENGTHS,
        dict(uv=20, ir=50, raman=50),
        dict(uv=10, ir=25, raman=25),
        dict(uv=mask_ratio, ir=mask_ratio, raman=mask_ratio),
    )


def small_specs(mask_ratio=0.25):
    """Short synthetic spectra, so the model tests run in a second."""
    return make_specs(
        ("a", "b"),
        dict(a=60, b=100),
        dict(a=10, b=20),
        dict(a=5, b=10),
        dict(a=mask_ratio, b=mask_ratio),
    )


def test_official_token_and_mask_counts():
    specs = official_specs()
    assert [s.num_patches for s in specs] == [69, 139, 139]
    assert [s.num_masked for s in specs] == [7, 14, 14]
    for s in specs:
        mask = spectra.random_patch_mask(jax.random.key(3), (5,), s)
        assert mask.shape == (5, s.num_patches)
        np.testing.assert_array_equal(np.sum(mask, axis=1), s.num_masked)


def test_mask_ratio_is_honoured_per_type():
    specs = make_specs(
        ("uv", "ir"), LENGTHS, dict(uv=20, ir=50), dict(uv=10, ir=25), dict(uv=0.3, ir=0.0)
    )
    assert specs[0].num_masked == 69 - int(69 * 0.7)  # 21
    assert specs[1].num_masked == 0
    mask = spectra.random_patch_mask(jax.random.key(0), (4,), specs[0])
    np.testing.assert_array_equal(np.sum(mask, axis=1), 21)
    # Different rows (molecules) get different masks.
    assert not np.array_equal(mask[0], mask[1])


def test_patchify_is_the_strided_window_and_drops_the_last_point():
    spec = official_specs()[0]
    x = np.arange(701, dtype=np.float32)[None]
    p = np.asarray(spectra.patchify(jnp.asarray(x), spec))
    assert p.shape == (1, 69, 20)
    for k in (0, 1, 68):
        np.testing.assert_array_equal(p[0, k], x[0, 10 * k : 10 * k + 20])
    assert p.max() == 699  # point 700 (15.0 eV) is never used (quirk Q4)


def test_normalisations_match_numpy():
    s = np.array([0.0, 0.5, 9.0, 99.0], np.float32)
    np.testing.assert_allclose(spectra.normalize(s, "log10"), np.log10(1 + s), rtol=1e-6)
    np.testing.assert_allclose(spectra.normalize(s, "log"), np.log1p(s), rtol=1e-6)
    np.testing.assert_allclose(
        spectra.normalize(s, "minmax", (0.5, 99.0)), (s - 0.5 + 1e-8) / (98.5 + 1e-8), rtol=1e-6
    )
    np.testing.assert_array_equal(spectra.normalize(s, "none"), s)
    with pytest.raises(ValueError, match="unknown spectrum normalisation"):
        spectra.normalize(s, "zscore")


def test_bad_spec_values_are_clear_errors():
    with pytest.raises(ValueError, match="exceeds its length"):
        spectra.SpectrumSpec("uv", 10, 20, 10, 0.1)
    with pytest.raises(ValueError, match="mask_ratio"):
        spectra.SpectrumSpec("uv", 701, 20, 10, 1.0)
    with pytest.raises(ValueError, match="'raman' has no stride"):
        make_specs(("raman",), LENGTHS, dict(raman=50), dict(), dict(raman=0.1))


@pytest.mark.parametrize("embed_dim, expected", [(256, 11_844_344), (128, 6_158_712)])
def test_official_parameter_count(embed_dim, expected):
    specs = official_specs()
    model = SpecFormer(specs, embed_dim=embed_dim)
    x = {s.name: jnp.zeros((2, s.length)) for s in specs}
    variables = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), x, jnp.ones(2, bool), mask_rng=jax.random.key(1), train=True
        )
    )
    assert count_params(variables["params"]) == expected
    # BatchNorm running mean/var of 2 norms x 3 layers x 128 channels, outside the parameters.
    assert count_params(variables["batch_stats"]) == 2 * 3 * 2 * 128


def _small_model(specs):
    return SpecFormer(specs, embed_dim=16, d_model=16, num_layers=2, num_heads=4, d_ff=32)


def _random_spectra(key, specs, g):
    keys = jax.random.split(key, len(specs))
    return {s.name: 10.0 * jax.random.uniform(k, (g, s.length)) for s, k in zip(specs, keys)}


def test_outputs_shapes_and_masks():
    specs = small_specs()
    model = _small_model(specs)
    x = _random_spectra(jax.random.key(0), specs, 6)
    gm = jnp.ones(6, bool)
    variables = model.init(jax.random.key(1), x, gm, mask_rng=jax.random.key(2), train=True)
    out, _ = model.apply(
        variables, x, gm, mask_rng=jax.random.key(2), train=True, mutable=["batch_stats"]
    )
    assert out["embedding"].shape == (6, 16)
    for s in specs:
        assert out["reconstruction"][s.name].shape == (6, s.num_patches, s.patch_len)
        np.testing.assert_allclose(
            out["patches"][s.name], spectra.patchify(jnp.log10(1 + x[s.name]), s), rtol=1e-6
        )
        np.testing.assert_array_equal(out["mask"][s.name].sum(axis=1), s.num_masked)
    unmasked = model.apply(variables, x, gm, mask_rng=None, train=False)
    assert not any(bool(m.any()) for m in unmasked["mask"].values())


def test_masked_patches_are_hidden_from_the_encoder():
    """Changing the raw values inside masked patches (only there) changes no output."""
    specs = small_specs()
    model = _small_model(specs)
    x = _random_spectra(jax.random.key(0), specs, 4)
    gm = jnp.ones(4, bool)
    key = jax.random.key(7)
    variables = model.init(jax.random.key(1), x, gm, mask_rng=key, train=True)
    out = model.apply(variables, x, gm, mask_rng=key, train=False)
    x2 = {}
    for s in specs:
        m = np.asarray(out["mask"][s.name])
        # Points covered only by masked patches (overlapping unmasked patches also see a point).
        seen = np.zeros((4, s.length), bool)
        idx = spectra.patch_indices(s)
        for g in range(4):
            seen[g, idx[~m[g]].ravel()] = True
        x2[s.name] = jnp.where(jnp.asarray(seen), x[s.name], 1e3)
        assert (~seen).any()
    out2 = model.apply(variables, x2, gm, mask_rng=key, train=False)
    np.testing.assert_allclose(out2["embedding"], out["embedding"], rtol=1e-6, atol=1e-6)
    for s in specs:
        np.testing.assert_allclose(
            out2["reconstruction"][s.name], out["reconstruction"][s.name], atol=1e-6
        )


def test_batchnorm_statistics_exclude_padding_slots():
    """In training mode, what padding slots hold changes neither real outputs nor running stats."""
    specs = small_specs()
    model = _small_model(specs)
    x = _random_spectra(jax.random.key(0), specs, 6)
    gm = jnp.array([True, True, True, True, False, False])
    variables = model.init(jax.random.key(1), x, gm, mask_rng=jax.random.key(2), train=True)
    x_junk = {k: v.at[4:].set(1e4) for k, v in x.items()}

    def run(inp):
        return model.apply(
            variables, inp, gm, mask_rng=jax.random.key(2), train=True, mutable=["batch_stats"]
        )

    (out_a, st_a), (out_b, st_b) = run(x), run(x_junk)
    np.testing.assert_allclose(out_a["embedding"][:4], out_b["embedding"][:4], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(st_a), jax.tree.leaves(st_b)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # ... and the batch statistics are those of the real rows only: the same as a 4-row batch.
    out_c, st_c = model.apply(
        variables,
        {k: v[:4] for k, v in x.items()},
        gm[:4],
        mask_rng=jax.random.key(2),
        train=True,
        mutable=["batch_stats"],
    )
    for a, c in zip(jax.tree.leaves(st_a), jax.tree.leaves(st_c)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    # Running statistics moved away from their initial values (momentum 0.9).
    init_mean = variables["batch_stats"]["layers_0"]["norm_attn"]["bn"]["mean"]
    assert not np.allclose(st_a["batch_stats"]["layers_0"]["norm_attn"]["bn"]["mean"], init_mean)


def test_eval_mode_is_per_molecule():
    """With running statistics, a molecule's embedding does not depend on its batch-mates."""
    specs = small_specs()
    model = _small_model(specs)
    x = _random_spectra(jax.random.key(0), specs, 5)
    gm = jnp.ones(5, bool)
    variables = model.init(jax.random.key(1), x, gm, mask_rng=None, train=True)
    full = model.apply(variables, x, gm, mask_rng=None, train=False)["embedding"]
    one = model.apply(
        variables, {k: v[2:3] for k, v in x.items()}, gm[:1], mask_rng=None, train=False
    )
    np.testing.assert_allclose(one["embedding"][0], full[2], rtol=1e-5, atol=1e-5)


def test_initialisation_follows_the_torch_code():
    specs = official_specs()
    model = SpecFormer(specs, embed_dim=256)
    x = {s.name: jnp.zeros((2, s.length)) for s in specs}
    params = jax.jit(
        lambda: model.init(jax.random.key(0), x, jnp.ones(2, bool), mask_rng=None, train=True)
    )()["params"]
    pos = np.asarray(params["pos_ir"])
    assert pos.shape == (139, 128) and -0.02 <= pos.min() < -0.019 and 0.019 < pos.max() <= 0.02
    head = np.asarray(
        params["embed_proj"]["kernel"]
    )  # Xavier bound sqrt(6 / (44416 + 256)) ~ 0.0116
    assert 0.0110 < np.abs(head).max() <= np.sqrt(6 / (44416 + 256)) * (1 + 1e-6)
    assert not np.asarray(params["embed_proj"]["bias"]).any()
    out = params["layers_0"]["out_proj"]  # torch's default Linear init: U(+-1/sqrt(128)) incl. bias
    assert 0.08 < np.abs(out["kernel"]).max() <= 1 / np.sqrt(128) * (1 + 1e-6)
    assert 0.08 < np.abs(out["bias"]).max() <= 1 / np.sqrt(128) * (1 + 1e-6)


def test_attention_core_equals_softmax_then_product_with_its_written_out_gradient():
    """``_attend`` (softmax of the scores times the values, with a hand-written backward that keeps
    fewer ``[B, H, T, T]`` tensors) gives the values of ``jax.nn.softmax`` + einsum exactly and
    their autodiff gradients to float rounding, for scores of the sizes RealFormer accumulates."""
    from mspec.models.specformer import _attend

    rng = np.random.default_rng(0)
    scores = jnp.asarray(3.0 * rng.standard_normal((2, 3, 11, 11)).astype(np.float32))
    v = jnp.asarray(rng.standard_normal((2, 3, 11, 4)).astype(np.float32))
    cot = jnp.asarray(rng.standard_normal((2, 3, 11, 4)).astype(np.float32))

    def plain(s, v):
        return jnp.einsum("bhqk,bhkc->bhqc", jax.nn.softmax(s, axis=-1), v)

    np.testing.assert_array_equal(jax.jit(_attend)(scores, v), jax.jit(plain)(scores, v))
    for fn_grads in zip(*(jax.jit(jax.grad(lambda s, v: jnp.sum(fn(s, v) * cot), argnums=(0, 1)))(scores, v)
                          for fn in (plain, _attend))):
        want, got = fn_grads
        np.testing.assert_allclose(got, want, atol=1e-6 * float(jnp.abs(want).max()), rtol=0)

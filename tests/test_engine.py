"""The engine on a tiny SD-shaped model: gradients, invariants, determinism, resume, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import random_photos
from zo_core.config import TIConfig, ZOConfig
from zo_core.engine import Personalizer, step_generator
from zo_core.objective import Objective

TI = TIConfig(placeholder="<tok>", initializer="dog")


@pytest.fixture(scope="module")
def data(tiny_engine: Personalizer):  # type: ignore[no-untyped-def]
    return tiny_engine.prepare_data_from_images(random_photos(3), TI)


def _objective(engine: Personalizer, data) -> Objective:  # type: ignore[no-untyped-def]
    return Objective(engine.text_encoder, engine.unet, engine.scheduler, engine.splicer, data.token_ids)


def test_model_facts_are_read_from_the_folder(tiny_engine: Personalizer) -> None:
    assert tiny_engine.token_dim == 32
    assert tiny_engine.info.resolution == 64 and tiny_engine.info.vae_scale_factor == 2
    assert tiny_engine.num_train_timesteps == 1000
    assert len(tiny_engine.fingerprint) == 16


def test_latents_are_cached_with_flips_and_vae_is_freed(tiny_engine: Personalizer, data) -> None:  # type: ignore[no-untyped-def]
    assert data.latent_mean.shape == (6, 4, 32, 32)  # 3 photos + 3 flips, 64 px / 2
    assert tiny_engine._vae is None


def test_rge_agrees_with_autograd(tiny_engine: Personalizer, data) -> None:  # type: ignore[no-untyped-def]
    """Averaged over many directions, the ZO estimate points where the true gradient does."""
    obj = _objective(tiny_engine, data)
    sample = tiny_engine._draw_sample(data, step_generator(0, 0), (500, 900))
    theta = tiny_engine.init_state(TI).theta
    true, _ = tiny_engine._backprop_grad(obj, sample, theta)
    gen = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(8):  # 8 x 32 directions, each batch one forward
        g, _, _ = tiny_engine._zo_grad(obj, sample, theta, ZOConfig(n=32), gen, None, 0.0)
        estimates.append(g)
    cos = torch.nn.functional.cosine_similarity(torch.stack(estimates).mean(0), true, dim=0)
    single = torch.nn.functional.cosine_similarity(estimates[0], true, dim=0)
    assert cos > 0.8, cos  # chance level is ~ 1/sqrt(32) = 0.18
    assert single > 0.3, single


def test_batched_and_sequential_forwards_agree(tiny_engine: Personalizer, data) -> None:  # type: ignore[no-untyped-def]
    obj = _objective(tiny_engine, data)
    sample = tiny_engine._draw_sample(data, step_generator(1, 0), (0, 1000))
    cands = tiny_engine.init_state(TI).theta[None] + 0.1 * torch.randn(3, 1, 32)
    torch.testing.assert_close(obj.losses(sample, cands), obj.losses(sample, cands, batched=False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["zo", "backprop"])
def test_only_the_token_changes(tiny_engine: Personalizer, data, optimizer: str) -> None:  # type: ignore[no-untyped-def]
    before = {k: v.clone() for k, v in tiny_engine.text_encoder.state_dict().items()}
    before.update({f"unet.{k}": v.clone() for k, v in tiny_engine.unet.state_dict().items()})
    state = tiny_engine.init_state(TI)
    res = tiny_engine.train(data, state, ZOConfig(tau=4), 6, optimizer=optimizer)
    after = dict(tiny_engine.text_encoder.state_dict())
    after.update({f"unet.{k}": v for k, v in tiny_engine.unet.state_dict().items()})
    assert all(torch.equal(before[k], after[k]) for k in before), "a model weight changed"
    assert not torch.equal(res.state.theta, state.theta)
    assert torch.equal(state.theta, tiny_engine.init_state(TI).theta)  # input state untouched
    assert res.forward_passes == (18 if optimizer == "zo" else 6)


def _eval_loss(engine: Personalizer, data, theta: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    return engine.evaluate(data, engine.init_state(TI).replace(theta=theta), window=(500, 900), draws=24, seed=999)


@pytest.mark.parametrize("optimizer", ["zo", "backprop"])
def test_loss_goes_down(tiny_engine: Personalizer, data, optimizer: str) -> None:  # type: ignore[no-untyped-def]
    state = tiny_engine.init_state(TI, seed=3)
    res = tiny_engine.train(data, state, ZOConfig(lr=3e-2, tau=16), 60, optimizer=optimizer)
    assert _eval_loss(tiny_engine, data, res.state.theta) < _eval_loss(tiny_engine, data, state.theta)


def test_same_seed_same_token_and_chunking_is_exact(tiny_engine: Personalizer, data) -> None:  # type: ignore[no-untyped-def]
    zo = ZOConfig(tau=4)
    a = tiny_engine.train(data, tiny_engine.init_state(TI, seed=7), zo, 10).state
    b = tiny_engine.train(data, tiny_engine.init_state(TI, seed=7), zo, 10).state
    c1 = tiny_engine.train(data, tiny_engine.init_state(TI, seed=7), zo, 3).state
    c = tiny_engine.train(data, c1, zo, 7).state
    d = tiny_engine.train(data, tiny_engine.init_state(TI, seed=8), zo, 10).state
    assert torch.equal(a.theta, b.theta) and torch.equal(a.theta, c.theta)
    assert torch.equal(a.sg_dirs, c.sg_dirs)
    assert not torch.equal(a.theta, d.theta)


def test_puts_window_is_respected_in_training(tiny_engine: Personalizer, data) -> None:  # type: ignore[no-untyped-def]
    res = tiny_engine.train(data, tiny_engine.init_state(TI), ZOConfig(puts=(500, 900)), 30)
    assert all(500 <= t < 900 for t in res.timesteps)
    res = tiny_engine.train(data, tiny_engine.init_state(TI), ZOConfig(puts=(10, 12)), 10)
    assert set(res.timesteps) <= {10, 11}


def test_sg_refreshes_every_tau_steps(tiny_engine: Personalizer, data) -> None:  # type: ignore[no-untyped-def]
    state = tiny_engine.init_state(TI)
    r1 = tiny_engine.train(data, state, ZOConfig(tau=8), 7)
    assert r1.state.sg_dirs.shape[0] == 0 and r1.state.sg_buffer.shape == (7, 32)
    r2 = tiny_engine.train(data, r1.state, ZOConfig(tau=8), 1)
    assert r2.state.sg_dirs.shape[0] > 0 and r2.state.sg_buffer.shape == (8, 32)
    off = tiny_engine.train(data, state, ZOConfig(tau=8, use_sg=False), 8)
    assert off.state.sg_dirs.shape[0] == 0
    # The default buffer length follows the token size: D = 32 -> 8 rows, the paper's 128 from D = 512.
    assert [ZOConfig().sg_tau(d) for d in (4, 32, 64, 768, 2048)] == [2, 8, 16, 128, 128]
    assert ZOConfig(tau=50).sg_tau(64) == 50
    auto = tiny_engine.train(data, state, ZOConfig(), 8)
    assert auto.state.sg_dirs.shape[0] > 0 and auto.state.sg_buffer.shape == (8, 32)


def test_spsa_and_multi_vector_tokens(tiny_engine: Personalizer) -> None:
    ti = TIConfig(placeholder="<multi>", initializer="cat", num_vectors=3)
    data = tiny_engine.prepare_data_from_images(random_photos(2, seed=1), ti, captions=["a photo of {} on a sofa", None])
    res = tiny_engine.train(data, tiny_engine.init_state(ti), ZOConfig(estimator="spsa", n=2), 3, keep_grads=True)
    assert res.state.theta.shape == (3, 32) and res.forward_passes == 12
    assert res.updates.shape == (3, 96) and res.grads.shape == (3, 96)


def test_state_round_trips_through_tensors(tiny_engine: Personalizer, data) -> None:  # type: ignore[no-untyped-def]
    from zo_core.state import PersonalState

    st = tiny_engine.train(data, tiny_engine.init_state(TI), ZOConfig(tau=4), 5).state
    back = PersonalState.from_tensors(st.to_tensors())
    assert back.placeholder == "<tok>" and back.step == 5 and torch.equal(back.theta, st.theta)
    # continuing from the reloaded state is bit-identical to continuing in memory (SG projector included)
    assert st.sg_dirs.shape[0] > 0
    cont = tiny_engine.train(data, st, ZOConfig(tau=4), 3).state
    assert torch.equal(tiny_engine.train(data, back, ZOConfig(tau=4), 3).state.theta, cont.theta)
    bad = st.to_tensors()
    bad["theta"] = torch.full_like(bad["theta"], float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        PersonalState.from_tensors(bad)


def test_other_schedulers_and_v_prediction(tmp_path: Path) -> None:
    from zo_core.model_factory import TinySDSpec, build_tiny_sd

    d = build_tiny_sd(tmp_path / "v", TinySDSpec(token_dim=48, prediction_type="v_prediction", scheduler="euler",
                                                  attention_head_dim=8), seed=1)  # fmt: skip
    engine = Personalizer.from_pretrained(d)
    assert engine.token_dim == 48 and engine.info.prediction_type == "v_prediction"
    data = engine.prepare_data_from_images(random_photos(2), TI)
    res = engine.train(data, engine.init_state(TI), ZOConfig(), 2)
    assert res.state.theta.shape == (1, 48)
    imgs = engine.generate(res.state, ["a photo of <tok>"], num_images=1, steps=2)
    assert imgs[0].size == (64, 64)


@pytest.mark.parametrize("backend", ["quanto-int8", "quanto-int4"])
def test_quantized_engine_learns_with_frozen_weights(tiny_model_dir: Path, backend: str) -> None:
    from zo_core.config import QuantConfig

    engine = Personalizer.from_pretrained(tiny_model_dir, quant=QuantConfig(backend=backend))
    assert engine.quant_report is not None and engine.quant_report.total_after < engine.quant_report.total_before
    # the fleet shares one base model; bits are each device's choice
    assert engine.fingerprint == Personalizer.from_pretrained(tiny_model_dir).fingerprint
    data = engine.prepare_data_from_images(random_photos(2), TI)
    before = {k: v.clone() for k, v in engine.unet.state_dict().items() if isinstance(v, torch.Tensor)}
    for optimizer in ("zo", "backprop"):
        res = engine.train(data, engine.init_state(TI), ZOConfig(tau=4), 3, optimizer=optimizer)
        assert torch.isfinite(res.state.theta).all() and not torch.equal(res.state.theta, engine.init_state(TI).theta)
    after = engine.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_are_kept_only_when_asked_and_are_the_raw_estimates(tiny_engine: Personalizer, data) -> None:  # type: ignore[no-untyped-def]
    state = tiny_engine.init_state(TI)
    plain = tiny_engine.train(data, state, ZOConfig(tau=2), 4)
    kept = tiny_engine.train(data, state, ZOConfig(tau=2), 4, keep_grads=True)
    assert plain.grads.numel() == 0 and kept.grads.shape == (4, 32)
    assert torch.equal(plain.state.theta, kept.state.theta)  # recording changes nothing
    # Three steps with tau = 2: the directions refreshed after step 2 are projected out of step 3's
    # applied gradient, and the final state still holds them; the kept estimate is unprojected.
    three = tiny_engine.train(data, state, ZOConfig(tau=2), 3, keep_grads=True)
    dirs = three.state.sg_dirs
    assert dirs.shape[0] > 0
    assert float((dirs @ three.grads[2]).abs().max()) > 1e-6

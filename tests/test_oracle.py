"""The shipped oracle: held-out accuracy, concept and prompt fidelity, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from simulations.world.concepts import get_concept, list_concepts
from simulations.world.oracle import Oracle, PromptSpec, context_prompts, to_tensor
from simulations.world.render import ATTRIBUTES, render_image, sample_scene
from simulations.world.train_oracle import augment, make_batch


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    torch.set_num_threads(1)
    return Oracle.load()


def test_held_out_accuracy_at_least_95_percent(oracle: Oracle) -> None:
    # A stream (seed 123) that training (seed 0) never drew from; clean and augmented.
    x, y = make_batch(np.random.default_rng([123, 5]), 300)
    for images in (x, augment(x, torch.Generator().manual_seed(1))):
        with torch.no_grad():
            _, logits = oracle.net(images)
        for attr in ATTRIBUTES:
            acc = float((logits[attr].argmax(1) == y[attr]).float().mean())
            assert acc >= 0.95, f"{attr}: {acc}"


def test_predict_returns_words(oracle: Oracle) -> None:
    rng = np.random.default_rng(3)
    scene = sample_scene(rng)
    (pred,) = oracle.predict([render_image(scene, rng)])
    assert pred == scene.as_dict()


def test_concept_fidelity_separates_concepts(oracle: Oracle) -> None:
    mosaic, grape = get_concept("mosaic"), get_concept("grape")
    own = mosaic.private_photos(seed=11)  # other photos than the reference set (seed 0)
    good = oracle.concept_fidelity(own, mosaic)
    bad = oracle.concept_fidelity(grape.private_photos(seed=11), mosaic)
    assert good["match"] == 1.0 and good["n"] == len(own)
    assert bad["match"] == 0.0 and bad["shape"] == 0.0
    assert good["feature_cosine"] > bad["feature_cosine"] + 0.1


def test_prompt_fidelity(oracle: Oracle) -> None:
    rng = np.random.default_rng(4)
    concept = get_concept("ember")
    spec = PromptSpec("a photo of {} on a gray background", {"background": "gray"})
    on_gray = [render_image(sample_scene(rng, fixed={**concept.attributes, "background": "gray"}),
                            rng) for _ in range(6)]
    on_black = [render_image(sample_scene(rng, fixed={"background": "black"}), rng)
                for _ in range(6)]
    assert oracle.prompt_fidelity(on_gray, spec, concept) == {
        "background": 1.0, "match": 1.0, "concept_match": 1.0, "n": 6.0}
    assert oracle.prompt_fidelity(on_black, spec)["match"] == 0.0
    assert spec.prompt("<ember>") == "a photo of <ember> on a gray background"


def test_context_prompts_skip_the_concepts_colour() -> None:
    green = get_concept("harlequin")
    assert green.colour == "green"
    specs = context_prompts(green)
    assert all(s.context.get("background") != "green" for s in specs)
    assert len(context_prompts()) == len(specs) + 1
    for name in list_concepts():
        assert all(s.template.count("{}") == 1 for s in context_prompts(get_concept(name)))


def test_bad_inputs(oracle: Oracle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        PromptSpec("a photo on a gray background", {"background": "gray"})
    with pytest.raises(ValueError, match="context attribute"):
        PromptSpec("a photo of {}", {"shape": "circle"})
    with pytest.raises(ValueError, match="context background must be one of"):
        PromptSpec("a photo of {}", {"background": "pink"})
    with pytest.raises(ValueError, match="asks for no context"):
        oracle.prompt_fidelity(get_concept("ember").private_photos(), PromptSpec("{}"))
    with pytest.raises(FileNotFoundError, match="oracle file"):
        Oracle.load(tmp_path)
    with pytest.raises(ValueError, match="no images"):
        to_tensor([])
    with pytest.raises(ValueError, match="shape"):
        to_tensor(np.zeros((2, 64, 64)))

"""The synthetic world: rendering, captions, concepts (fast, no model)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simulations.world.captions import describe, training_caption, vocabulary
from simulations.world.concepts import (
    IDENTITY,
    UNNAMED,
    get_concept,
    hidden_combinations,
    is_nameless,
    list_concepts,
)
from simulations.world.render import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLOUR_RGB,
    Scene,
    render,
    render_batch,
    sample_scene,
)


def test_render_is_seeded_and_shows_the_object() -> None:
    scene = Scene("circle", "red", "plain", "big", "left", "white")
    a = render(scene, np.random.default_rng(3))
    b = render(scene, np.random.default_rng(3))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    red = np.all(a == COLOUR_RGB["red"], axis=-1)
    white = np.all(a == BACKGROUND_RGB["white"], axis=-1)
    assert red.sum() > 500 and (red | white).all()
    # "left": the object's mass lies in the left half.
    xs = np.nonzero(red)[1]
    assert xs.mean() < 24


def test_size_position_and_pattern_are_rendered() -> None:
    rng = np.random.default_rng(0)
    small = render(Scene("square", "blue", "plain", "small", "right", "gray"), rng)
    big = render(Scene("square", "blue", "plain", "big", "right", "gray"), rng)
    blue = np.array(COLOUR_RGB["blue"])
    n_small, n_big = (np.all(im == blue, -1).sum() for im in (small, big))
    assert n_big > 2.5 * n_small
    assert np.nonzero(np.all(small == blue, -1))[1].mean() > 40
    striped = render(Scene("square", "blue", "striped", "big", "middle", "gray"), rng)
    dark = np.all(striped == (blue * 0.4).astype(np.uint8), -1)
    assert dark.sum() > 200  # the pattern's second tone is drawn


def test_render_speed_thousands_per_second() -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(500)]
    t0 = time.perf_counter()
    render_batch(scenes, rng)
    assert 500 / (time.perf_counter() - t0) > 1000


def test_bad_scenes_are_rejected() -> None:
    with pytest.raises(ValueError, match="shape must be one of"):
        Scene("hexagon", "red", "plain", "big", "left", "white")
    with pytest.raises(ValueError, match="invisible"):
        sample_scene(np.random.default_rng(0), fixed={"colour": "blue", "background": "blue"})
    with pytest.raises(ValueError, match="unknown scene attributes"):
        sample_scene(np.random.default_rng(0), fixed={"texture": "rough"})
    with pytest.raises(ValueError, match="resolution"):
        render(Scene("circle", "red", "plain", "big", "left", "white"),
               np.random.default_rng(0), resolution=50)


def test_sampled_scenes_never_blend_into_background() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        s = sample_scene(rng)
        assert s.colour != s.background
    s = sample_scene(rng, fixed={"background": "green"})
    assert s.colour != "green"


def test_captions_name_attributes_and_hide_unnamed_ones() -> None:
    scene = Scene("triangle", "red", "striped", "small", "left", "blue")
    assert describe(scene) == "a small red striped triangle on the left, on a blue background"
    hidden = Scene("diamond", "teal", "checkered", "big", "middle", "white")
    assert describe(hidden) == "a big diamond in the middle, on a white background"
    rng = np.random.default_rng(0)
    unnamed = {w for words in UNNAMED.values() for w in words}
    combos = hidden_combinations()
    for _ in range(2000):
        s = sample_scene(rng)
        cap = training_caption(s, rng)
        assert s.shape in cap
        assert not unnamed & set(cap.replace(",", "").split())
        if (s.shape, s.colour, s.pattern) in combos:
            assert not (s.colour in cap.split() and s.pattern in cap.split())
    with pytest.raises(ValueError, match="drop"):
        training_caption(scene, rng, drop=1.0)


def test_vocabulary_covers_every_attribute_word() -> None:
    vocab = set(vocabulary())
    assert {w for v in ATTRIBUTES.values() for w in v} <= vocab
    assert {"photo", "of", "background"} <= vocab


def test_concepts_api(tmp_path: Path) -> None:
    names = list_concepts()
    assert len(names) >= 8 and len(set(names)) == len(names)
    for name in names:
        c = get_concept(name)
        assert c.initializer in vocabulary()
        photos = c.private_photos(seed=0)
        assert 4 <= len(photos) <= 6 and all(p.size == (64, 64) for p in photos)
        scenes = c.scenes(seed=0)
        assert all(s.as_dict()[a] == c.attributes[a] for s in scenes for a in IDENTITY)
        # varied pose: not all photos share size, position and background
        assert len({(s.size, s.position, s.background) for s in scenes}) == len(scenes)
        # every concept is nameless: an unnamed value or a hidden combination
        assert is_nameless(c)
    c = get_concept("<" + names[0] + ">")
    a = [np.asarray(p) for p in c.private_photos(seed=7)]
    b = [np.asarray(p) for p in c.private_photos(seed=7)]
    other = [np.asarray(p) for p in c.private_photos(seed=8)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other, strict=True))
    paths = c.write_photos(tmp_path / "photos", seed=7)
    assert [p.name for p in paths] == [f"{c.name}_{i}.png" for i in range(len(a))]
    assert np.array_equal(np.asarray(Image.open(paths[0])), a[0])


def test_unknown_concept_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown concept 'unicorn'; known concepts"):
        get_concept("unicorn")


def test_training_caption_named_reports_what_the_caption_says() -> None:
    from simulations.world.captions import training_caption_named

    rng = np.random.default_rng(2)
    for _ in range(300):
        s = sample_scene(rng)
        state = rng.bit_generator.state
        cap, named = training_caption_named(s, rng)
        rng.bit_generator.state = state
        assert training_caption(s, rng) == cap  # same draws, same caption
        assert cap == describe(s, named=named - {"shape"}, prefix=cap[: cap.index("a ")]) or (
            cap.endswith(describe(s, named=named - {"shape"})))
        words = set(cap.replace(",", "").split())
        for attr in ("size", "colour", "pattern"):
            assert (getattr(s, attr) in words) == (attr in named) or attr == "colour"


def test_training_captions_are_the_shipped_models_recipe() -> None:
    """The shipped model was trained on exactly these captions: adding a concept must not change
    them (a changed caption stream silently invalidates `train_model --resume` and the model)."""
    import hashlib

    rng = np.random.default_rng([0, 3, 0])
    digest = hashlib.sha256()
    for _ in range(5000):
        digest.update(training_caption(sample_scene(rng), rng).encode())
    assert digest.hexdigest() == "c2cfcc8a521fdca60d3090de4deea34782e5cbbe141e3e693b4d86e6daeb7c65"


def test_a_named_triple_is_not_a_personal_concept() -> None:
    from simulations.world.concepts import Concept

    assert not is_nameless(Concept("plainred", "square", "red", "plain", "square"))
    assert is_nameless(Concept("tealsq", "square", "teal", "plain", "square"))


def test_figures_show_every_concept(tmp_path: Path) -> None:
    from simulations.world.figures import concept_photos, world_samples

    grid = Image.open(concept_photos(tmp_path))
    assert grid.size[1] == len(list_concepts()) * 64 * 2  # one 2x-upscaled row per concept
    assert Image.open(world_samples(tmp_path, n=16)).size == (8 * 128, 2 * 128)


def test_compare_grids_checks_sizes(tmp_path: Path) -> None:
    from simulations.world.figures import compare_grids

    Image.new("RGB", (128, 64)).save(tmp_path / "a.png")
    Image.new("RGB", (128, 64)).save(tmp_path / "b.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "c.png")
    out = Image.open(compare_grids("lagoon", tmp_path / "a.png", tmp_path / "b.png", tmp_path))
    assert out.size == (2 * (2 * 128 + 4), 2 * (64 + 4 + 64))
    with pytest.raises(ValueError, match="differ in size"):
        compare_grids("lagoon", tmp_path / "a.png", tmp_path / "c.png", tmp_path)

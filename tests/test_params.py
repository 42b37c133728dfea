"""Hyperparameters are checked before any work: unknown names with a did-you-mean, wrong types, values
out of range; detector names are forgiving about case and separators."""

from __future__ import annotations

import inspect

import pytest

from imaging_ad.detectors import DETECTORS, ParameterError, create_detector, resolve_detector_name


def test_a_typo_gets_a_did_you_mean():
    with pytest.raises(
        ParameterError, match="no hyperparameter 'coreset_ration'; did you mean 'coreset_ratio'"
    ):
        create_detector("patchcore", coreset_ration=0.3)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"coreset_ratio": "abc"}, "coreset_ratio must be a number, got 'abc'"),
        ({"coreset_ratio": 1.5}, r"coreset_ratio must be in \(0, 1\], got 1.5"),
        ({"image_size": 256.5}, "image_size must be an integer"),
        ({"search": "annoy"}, "search must be one of 'auto', 'flat', 'hnsw'"),
        ({"target_fpr": 0.0}, r"target_fpr must be in \(0, 0.5\)"),
        ({"progress": "yes"}, "progress must be true or false"),
        ({"backbone_weights": 3}, "backbone_weights must be a string or None"),
    ],
)
def test_bad_values_are_refused_with_what_is_allowed(params, message):
    with pytest.raises(ParameterError, match=message):
        create_detector("patchcore", **params)


def test_a_fixed_length_list_of_another_length_is_refused_by_name():
    # (it used to crash inside the type check with a TypeError)
    with pytest.raises(ParameterError, match=r"coverage must be a list of 2 values, got \(0.1,\)"):
        create_detector("feature_draem", coverage=(0.1,))


def test_fit_checks_before_reading_any_image():
    detector = create_detector("padim")
    detector.n_features = -3  # set after construction: fit still refuses it first
    with pytest.raises(ParameterError, match="n_features"):
        detector.fit(["/this/file/does/not/exist.png"] * 4)  # reading it would raise ImageNotFoundError


def test_ensemble_members_parameters_are_checked():
    with pytest.raises(ParameterError, match="coreset_ratio"):
        create_detector("ensemble", member_params={"patchcore": {"coreset_ratio": 7}}).validate_params()


@pytest.mark.parametrize("spelling", ["PatchCore", "patchcore", " PATCHCORE ", "Patch-Core"])
def test_detector_names_are_case_insensitive(spelling):
    assert resolve_detector_name(spelling) == "patchcore"


def test_unknown_detector_suggests_the_nearest():
    with pytest.raises(ValueError, match="unknown detector 'padin'; did you mean padim"):
        create_detector("padin")


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_detector_documents_its_hyperparameters(name):
    cls = DETECTORS[name]
    own = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY]
    doc = cls.__doc__ or ""
    missing = [p for p in own if p not in doc]
    assert not missing, f"{cls.__name__}'s docstring does not document {missing}"

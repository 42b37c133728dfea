"""Model files that lie: forged thresholds (hash recomputed), forged export sidecars, a description that
does not fit its tensors, a pickle named like a TorchScript export. Integrity is always checked; with a
trust key or a trusted-hash list configured, authenticity too (issue 18, points 3, 5 and 8)."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from imaging_ad.cli import main
from imaging_ad.detectors import ModelFileError, load_detector
from imaging_ad.detectors.persistence import _digest
from imaging_ad.export import ExportedModelError, export_model, load_exported
from imaging_ad.export.sidecar import sidecar_path
from imaging_ad.io.checksum import file_sha256
from imaging_ad.trust import (
    HASHES_ENV,
    INTEGRITY_ONLY,
    KEYS_ENV,
    TrustPolicy,
    UntrustedModelError,
    generate_key,
    read_hash_list,
    sign_model,
    verify_model,
)
from tests.synthetic import texture
from tests.tiny_models import one_torch_thread, tiny_model, tiny_textures, tiny_torchscript_export


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    return {
        "patchcore": tiny_model("patchcore"),
        "padim": tiny_model("padim"),
        "torchscript": tiny_torchscript_export(),
    }


@pytest.fixture(autouse=True)
def no_trust_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv(HASHES_ENV, raising=False)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        description = json.loads(handle.metadata()["imaging_ad"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return description, tensors


def forge(source: Path, target: Path, edit, tensors_edit=None) -> Path:
    """What an attacker does: edit the description (and tensors), then recompute the built-in SHA-256."""
    description, tensors = _read(source)
    description.pop("sha256")
    edit(description)
    if tensors_edit is not None:
        tensors_edit(tensors)
    description["sha256"] = _digest(description, tensors)
    save_file(tensors, str(target), metadata={"imaging_ad": json.dumps(description)})
    return target


def set_threshold(value: float):
    def edit(description: dict) -> None:
        description["calibration"]["image_threshold"] = value

    return edit


def copy_export(model: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in (model, sidecar_path(model)):
        shutil.copy(path, folder / path.name)
    return folder / model.name


# -- the attack, without a policy: integrity passes, and the tools say that is all it means ------------


def test_forged_threshold_passes_the_integrity_check_alone(models, tmp_path, capsys) -> None:
    forged = forge(models["patchcore"], tmp_path / "forged.safetensors", set_threshold(1e9))
    detector = load_detector(forged, device="cpu")  # the checksum cannot tell: it was recomputed
    assert detector.calibration_.image_threshold == 1e9
    image = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(image), tiny_textures()[0])
    assert main(["predict", str(forged), str(image), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "authenticity NOT checked" in err and KEYS_ENV in err


def test_checksum_error_says_it_detects_damage_not_forgery(models, tmp_path) -> None:
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(models["patchcore"].read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="detects damage, not forgery"):
        load_detector(damaged, device="cpu")


# -- with a trust key ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    private, public = generate_key(folder / "team")
    other_private, other_public = generate_key(folder / "someone-else")
    return {
        "private": private,
        "public": public,
        "other_private": other_private,
        "other_public": other_public,
    }


def test_keygen_writes_a_private_key_only_its_owner_reads(keys) -> None:
    assert keys["private"].stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="exists already"):
        generate_key(keys["private"])


def test_signed_model_loads_and_forged_or_unsigned_ones_are_refused(models, keys, tmp_path) -> None:
    policy = TrustPolicy.from_files(keys=[keys["public"]])
    model = tmp_path / "model.safetensors"
    shutil.copy(models["patchcore"], model)
    sign_model(model, keys["private"])
    assert "signed by trusted key" in verify_model(model, policy)
    load_detector(model, device="cpu", trust=policy)

    # the forgery: threshold edited, hash recomputed, the old signature kept beside it
    forged = forge(model, tmp_path / "forged.safetensors", set_threshold(1e9))
    shutil.copy(model.with_name(model.name + ".sig"), forged.with_name(forged.name + ".sig"))
    with pytest.raises(UntrustedModelError, match="changed after it was signed") as refused:
        load_detector(forged, device="cpu", trust=policy)
    assert str(forged) in str(refused.value)

    unsigned = tmp_path / "unsigned.safetensors"
    shutil.copy(models["patchcore"], unsigned)
    with pytest.raises(UntrustedModelError, match="no signature"):
        load_detector(unsigned, device="cpu", trust=policy)

    # signed, but by a key nobody trusts
    sign_model(unsigned, keys["other_private"])
    with pytest.raises(UntrustedModelError, match="not a trusted key"):
        load_detector(unsigned, device="cpu", trust=policy)

    # a signature whose bytes were tampered with
    tampered = json.loads(model.with_name(model.name + ".sig").read_text())
    tampered["signature"] = tampered["signature"][:-4] + (
        "AAAA" if tampered["signature"][-4:] != "AAAA" else "BBBB"
    )
    model.with_name(model.name + ".sig").write_text(json.dumps(tampered))
    with pytest.raises(UntrustedModelError, match="not valid"):
        load_detector(model, device="cpu", trust=policy)


def test_trust_key_from_the_environment_guards_the_cli(models, keys, tmp_path, monkeypatch, capsys) -> None:
    import cv2

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), texture(np.random.default_rng(3), 64, 64))
    model = tmp_path / "model.safetensors"
    shutil.copy(models["patchcore"], model)
    forged = forge(model, tmp_path / "forged.safetensors", set_threshold(1e9))
    sign_model(model, keys["private"])
    monkeypatch.setenv(KEYS_ENV, str(keys["public"]))
    assert main(["predict", str(model), str(image), "--device", "cpu"]) == 0
    assert "authenticity checked" in capsys.readouterr().err
    assert main(["predict", str(forged), str(image), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "not trusted" in err and str(forged) in err and "Traceback" not in err
    # scan refuses it too, before writing anything
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(image, folder / "a.png")
    assert main(["scan", str(folder), "--model", str(forged), "--out", str(tmp_path / "out")]) == 1
    assert "not trusted" in capsys.readouterr().err


def test_cli_sign_and_keygen(models, tmp_path, monkeypatch, capsys) -> None:
    assert main(["keygen", str(tmp_path / "k")]) == 0
    model = tmp_path / "m.safetensors"
    shutil.copy(models["padim"], model)
    assert main(["sign", str(model), "--key", str(tmp_path / "k")]) == 0
    assert "signed" in capsys.readouterr().out
    monkeypatch.setenv(KEYS_ENV, str(tmp_path / "k.pub"))
    load_detector(model, device="cpu")  # the environment's policy
    assert main(["sign", str(model), "--key", str(tmp_path / "k.pub")]) == 1  # a public key cannot sign
    assert "private key" in capsys.readouterr().err


# -- with a list of trusted hashes -----------------------------------------------------------------------


def test_trusted_hash_lists_sha256sum_and_registry_json(models, tmp_path) -> None:
    digest = file_sha256(models["patchcore"])
    text = tmp_path / "trusted.txt"
    text.write_text(f"# models we deploy\n{digest}  patchcore.safetensors\nnot-a-hash x\n")
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": [{"name": "x", "sha256": digest.upper()}]}))
    assert read_hash_list(text) == {digest} == read_hash_list(registry)
    for listing in (text, registry):
        policy = TrustPolicy.from_files(hash_lists=[listing])
        assert "listed as trusted" in verify_model(models["patchcore"], policy)
        with pytest.raises(UntrustedModelError, match="not in the trusted list"):
            verify_model(models["padim"], policy)
    forged = forge(models["patchcore"], tmp_path / "forged.safetensors", set_threshold(1e9))
    with pytest.raises(UntrustedModelError):
        load_detector(forged, device="cpu", trust=TrustPolicy.from_files(hash_lists=[text]))


# -- exports: the sidecar is covered too ----------------------------------------------------------------


def forge_sidecar(model: Path, edit) -> None:
    side = sidecar_path(model)
    description = json.loads(side.read_text())
    edit(description)
    side.write_text(json.dumps(description, indent=2))


def test_forged_export_sidecar_is_refused_with_a_trust_key(models, keys, tmp_path) -> None:
    model = copy_export(models["torchscript"], tmp_path / "export")
    policy = TrustPolicy.from_files(keys=[keys["public"]])
    sign_model(model, keys["private"], sidecar=sidecar_path(model))
    assert load_exported(model, device="cpu", trust=policy).calibration_.image_threshold < 1e9

    # without a policy an edited sidecar is accepted: it carries no checksum of itself
    forge_sidecar(model, lambda d: d["calibration"].__setitem__("image_threshold", 1e9))
    assert load_exported(model, device="cpu").calibration_.image_threshold == 1e9
    with pytest.raises(UntrustedModelError, match=r"tiles\.pt\.json changed after it was signed"):
        load_exported(model, device="cpu", trust=policy)


def test_swapped_export_graph_is_refused_even_without_checksum_verification(models, keys, tmp_path) -> None:
    model = copy_export(models["torchscript"], tmp_path / "export")
    policy = TrustPolicy.from_files(keys=[keys["public"]])
    sign_model(model, keys["private"], sidecar=sidecar_path(model))
    with model.open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(UntrustedModelError, match="differs from the one its sidecar"):
        load_exported(model, device="cpu", verify_checksum=False, trust=policy)


def test_trusted_hash_of_an_export_is_its_sidecars(models, tmp_path) -> None:
    model = copy_export(models["torchscript"], tmp_path / "export")
    listing = tmp_path / "trusted.txt"
    listing.write_text(file_sha256(sidecar_path(model)) + "\n")
    policy = TrustPolicy.from_files(hash_lists=[listing])
    load_exported(model, device="cpu", trust=policy)
    forge_sidecar(model, lambda d: d["calibration"].__setitem__("image_threshold", 1e9))
    with pytest.raises(UntrustedModelError, match="not in the trusted list"):
        load_exported(model, device="cpu", trust=policy)


def test_cli_signs_an_export_with_its_sidecar(models, keys, tmp_path, monkeypatch, capsys) -> None:
    model = copy_export(models["torchscript"], tmp_path / "export")
    assert main(["sign", str(model), "--key", str(keys["private"])]) == 0
    assert "and its sidecar" in capsys.readouterr().out
    monkeypatch.setenv(KEYS_ENV, str(keys["public"]))
    load_exported(model, device="cpu")


# -- descriptions that do not fit their tensors, and pickles ----------------------------------------------


def test_padim_file_relabelled_patchcore_is_a_model_file_error(models, tmp_path, capsys) -> None:
    forged = forge(
        models["padim"], tmp_path / "relabelled.safetensors", lambda d: d.update(detector="patchcore")
    )
    with pytest.raises(ModelFileError, match="does not match its content") as refused:
        load_detector(forged, device="cpu")
    assert str(forged) in str(refused.value)
    assert main(["predict", str(forged), str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "does not match its content" in err and "Traceback" not in err


def test_padim_hyperparameters_under_a_patchcore_label(models, tmp_path) -> None:
    def relabel(description: dict) -> None:
        description["detector"] = "padim"
        description["params"]["coreset_ratio"] = 0.1  # a PatchCore parameter PaDiM does not take

    forged = forge(models["padim"], tmp_path / "params.safetensors", relabel)
    with pytest.raises(ModelFileError, match="coreset_ratio"):
        load_detector(forged, device="cpu")


@pytest.mark.parametrize("drop", ["state.memory_bank", "state.mean"])
def test_missing_tensor_is_a_model_file_error(models, tmp_path, drop) -> None:
    source = models["patchcore"] if "memory" in drop else models["padim"]
    forged = forge(source, tmp_path / "missing.safetensors", lambda d: None, lambda t: t.pop(drop))
    with pytest.raises(ModelFileError, match="missing entry"):
        load_detector(forged, device="cpu")


def test_misshapen_tensor_is_a_model_file_error(models, tmp_path) -> None:
    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors["state.mean"] = tensors["state.mean"][:3].contiguous()

    forged = forge(models["padim"], tmp_path / "misshapen.safetensors", lambda d: None, shrink)
    with pytest.raises(ModelFileError, match="does not match its content"):
        load_detector(forged, device="cpu")


@pytest.mark.parametrize("kind", ["legacy pickle", "torch.save zip"])
def test_pickle_with_forged_sidecar_is_refused_naming_the_file(models, tmp_path, kind, capsys) -> None:
    model = copy_export(models["torchscript"], tmp_path / "export")
    if kind == "legacy pickle":
        model.write_bytes(pickle.dumps({"threshold": 1e9}))
    else:
        torch.save({"weights": torch.zeros(3)}, model)
    forge_sidecar(model, lambda d: d.__setitem__("model_sha256", file_sha256(model)))
    with pytest.raises(ExportedModelError, match="not a TorchScript export") as refused:
        load_exported(model, device="cpu")
    message = str(refused.value)
    assert str(model) in message and "zip archive" in message and "central directory" not in message
    assert main(["predict", str(model), str(tmp_path), "--device", "cpu"]) == 1
    assert "not a TorchScript export" in capsys.readouterr().err


def test_integrity_only_is_the_stated_default() -> None:
    assert TrustPolicy.from_env({}).describe() == INTEGRITY_ONLY
    assert "detects damage, not a deliberate edit" in INTEGRITY_ONLY


def test_export_under_a_trust_policy_then_signing_the_export(models, keys, tmp_path, monkeypatch) -> None:
    model = tmp_path / "model.safetensors"
    shutil.copy(models["patchcore"], model)
    sign_model(model, keys["private"])
    monkeypatch.setenv(KEYS_ENV, str(keys["public"]))
    files = export_model(model, tmp_path / "export.pt", "torchscript")  # its own check needs no signature
    with pytest.raises(UntrustedModelError, match="no signature"):
        load_exported(files.model, device="cpu")
    sign_model(files.model, keys["private"], sidecar=files.sidecar)
    load_exported(files.model, device="cpu")

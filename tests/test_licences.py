"""The licence of every condition's weights: declared, resolved, recorded and enforced.

Random weights in local folders (tests/annotator_weights.py): what is checked is where a
licence comes from (declared for the default weights, a model card's `license:` for a
folder, else `unknown`), the sha256 of the very files loaded, the record in the manifest,
each sample's json and the dataset card, and `--licence-policy commercial` refusing before
any work. No statement here is about the weights' quality.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from annotator_weights import write_random_weights
from conftest import write_synthetic
from pipeline.build import BuildError, run_build
from pipeline.config import BuildConfig
from stages.annotators import REGISTRY, create
from stages.annotators.licences import UNKNOWN, card_licence

QUIET = dict(log=lambda *_: None)


def _config(tmp_path, **kw) -> BuildConfig:
    base = dict(input=[str(tmp_path / "in")], output=str(tmp_path / "out"), resolution=64, min_size=64,
                caption_model="none", executor="local", preview=0, report_samples=0, samples_per_shard=2)
    return BuildConfig(**{**base, **kw})


@pytest.fixture
def photos(tmp_path):
    write_synthetic(tmp_path / "in", 3, size=(96, 80))
    return tmp_path


@pytest.fixture(scope="module")
def hed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hed-weights")
    write_random_weights("hed", folder)
    return folder


def test_every_annotator_declares_its_licences():
    for name, cls in REGISTRY.items():
        annotator = create([name])[name]
        record = annotator.licence_record(name, hash_weights=False)
        assert record.code_licence, name
        if record.weights is not None:
            assert record.weights_licence and record.weights_source.startswith("https://"), name
    declared = {name: create([name])[name].licence_record(name, hash_weights=False) for name in ("hed", "openpose")}
    assert declared["hed"].weights_licence == "Apache-2.0" and declared["hed"].commercial
    assert "non-commercial" in declared["openpose"].weights_licence and not declared["openpose"].commercial
    pidinet = create(["hed"], {"hed": {"method": "pidinet"}})["hed"].licence_record("hed", hash_weights=False)
    assert pidinet.weights_licence == UNKNOWN and not pidinet.commercial, "declared per method, not per class"
    assert create(["canny"])["canny"].licence_record("canny").weights is None, "no weights, nothing to hash"


def test_a_folder_takes_its_model_card_licence_else_unknown(tmp_path, hed_folder):
    assert card_licence(tmp_path) == UNKNOWN
    (tmp_path / "README.md").write_text("---\nlibrary_name: x\nlicense: apache-2.0\n---\n# card\n")
    assert card_licence(tmp_path) == "Apache-2.0"
    (tmp_path / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    assert card_licence(tmp_path) == "CC-BY-NC-4.0"
    hed = create(["hed"], {"hed": {"weights": str(hed_folder)}})["hed"]
    record = hed.licence_record("hed")
    assert record.weights_licence == UNKNOWN and not record.commercial, "the declared licence is the hub repo's"
    expected = hashlib.sha256((hed_folder / "ControlNetHED.pth").read_bytes()).hexdigest()
    assert record.weights_sha256 == {"ControlNetHED.pth": expected}


def test_commercial_policy_refuses_openpose_before_any_work_and_suggests_dwpose(photos, monkeypatch):
    cfg = _config(photos, conditions=["canny", "openpose"], licence_policy="commercial")
    with pytest.raises(BuildError) as caught:
        run_build(cfg, **QUIET)
    message = str(caught.value)
    assert "openpose: its weights lllyasviel/Annotators" in message and "CMU OpenPose academic licence" in message
    assert message.endswith("use dwpose instead") and "canny" not in message.split("refuses", 1)[1]
    assert not (photos / "out").exists(), "refused before the output folder was touched"
    monkeypatch.delitem(REGISTRY, "dwpose")  # an install without the alternative: nothing to suggest
    with pytest.raises(BuildError) as caught:
        run_build(cfg, **QUIET)
    assert "instead" not in str(caught.value)


def test_commercial_policy_builds_with_dwpose(photos, tmp_path):
    """The default DWPose weights (yzd-v/DWPose) are Apache-2.0; a folder of them with its
    model card builds under the policy (random stand-in ONNX files: plumbing only)."""
    from pipeline import licences
    from test_dwpose import write_weights

    licences.enforce("commercial", create(["dwpose"]))
    folder = tmp_path / "dwpose"
    write_weights(folder)
    params = {"dwpose": {"weights": str(folder), "detect_resolution": 64}}
    cfg = _config(photos, conditions=["dwpose"], annotator_params=params, licence_policy="commercial")
    with pytest.raises(BuildError, match="dwpose: its weights .* are licensed unknown"):
        run_build(cfg, **QUIET)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    run_build(cfg, **QUIET)
    record = json.loads((photos / "out" / "manifest.json").read_text())["licences"]["dwpose"]
    assert record["commercial"] and sorted(record["weights_sha256"]) == ["dw-ll_ucoco_384.onnx", "yolox_l.onnx"]


def test_commercial_policy_runs_permissive_conditions_and_records_everything(photos, hed_folder):
    params = {"hed": {"weights": str(hed_folder), "detect_resolution": 64}}
    cfg = _config(photos, conditions=["canny", "hed"], annotator_params=params, licence_policy="commercial")
    with pytest.raises(BuildError, match=r"hed: its weights .* are licensed unknown \(no licence is known"):
        run_build(cfg, **QUIET)
    (hed_folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    try:
        run_build(cfg, **QUIET)
    finally:
        (hed_folder / "README.md").unlink()
    manifest = json.loads((photos / "out" / "manifest.json").read_text())
    hed = manifest["licences"]["hed"]
    assert hed["weights_licence"] == "Apache-2.0" and hed["commercial"] and hed["weights"] == str(hed_folder)
    assert hed["weights_sha256"]["ControlNetHED.pth"] == hashlib.sha256(
        (hed_folder / "ControlNetHED.pth").read_bytes()).hexdigest()
    assert manifest["licences"]["canny"]["weights"] is None and manifest["licences"]["canny"]["commercial"]
    with tarfile.open(photos / "out" / "shards" / "00000.tar") as tar:
        infos = [json.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers() if m.name.endswith(".json")]
    assert infos and all(i["conditions"]["hed"]["licence"] == "Apache-2.0" for i in infos)
    assert all(i["conditions"]["hed"]["weights_sha256"] == hed["digest"] for i in infos)
    assert all(i["conditions"]["canny"]["licence"] == "Apache-2.0" for i in infos)
    assert all("weights_sha256" not in i["conditions"]["canny"] for i in infos)


def test_a_resume_with_other_weights_is_refused(photos, hed_folder, tmp_path):
    """The same setting (a folder), other files in it: the shards would mix two models."""
    import shutil

    folder = tmp_path / "hed"
    shutil.copytree(hed_folder, folder)
    cfg = _config(photos, conditions=["hed"], annotator_params={"hed": {"weights": str(folder),
                                                                        "detect_resolution": 64}})
    run_build(cfg, **QUIET)
    (photos / "out" / "shards" / "00001.tar").unlink()  # a shard left to do
    with (folder / "ControlNetHED.pth").open("ab") as handle:
        handle.write(b"\0")  # other bytes in the same file
    with pytest.raises(BuildError, match="the weights of hed changed since"):
        run_build(cfg, **QUIET)


def test_the_dataset_card_has_a_licence_row_per_condition(photos, hed_folder, tmp_path):
    from pipeline.publish import publish

    params = {"hed": {"weights": str(hed_folder), "detect_resolution": 64}, "mlsd": {"method": "hough"}}
    run_build(_config(photos, conditions=["canny", "hed", "mlsd"], annotator_params=params), **QUIET)
    card = (publish(str(photos / "out"), to=str(tmp_path / "hf"), **QUIET) / "README.md").read_text()
    section = card.split("## Licences of the annotators", 1)[1].split("##", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == ["`canny`", "`hed`", "`mlsd`"]
    digest = json.loads((photos / "out" / "manifest.json").read_text())["licences"]["hed"]["digest"]
    assert f"(sha256 {digest})" in rows[1] and "| unknown |" in rows[1] and rows[1].endswith("| no |")
    assert "| none | n/a | n/a | yes |" in rows[0] and "| none |" in rows[2], "canny and Hough need no weights"

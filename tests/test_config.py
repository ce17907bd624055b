import pytest
import yaml

from configs import CONFIG_DIR, ConfigError, TaskKind, TaskSpec, load_config, load_pretrain_config

from tests.conftest import write_config


@pytest.mark.parametrize("name", ["breast_ultrasound.yaml", "chest_xray_age.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(CONFIG_DIR / name, check_paths=False)
    assert config.registry.model_name
    assert config.registry.require_skill  # a model without skill is never served (tests turn it off)


def test_shipped_configs_tasks():
    assert load_config(CONFIG_DIR / "breast_ultrasound.yaml", check_paths=False).data.task is TaskKind.CLASSIFICATION
    age = load_config(CONFIG_DIR / "chest_xray_age.yaml", check_paths=False)
    assert age.data.task is TaskKind.REGRESSION and age.data.columns == {"age": "patient_age"}


def test_unknown_key_is_named_with_file(tmp_path, breast_dicom_dir):
    path = write_config(tmp_path, breast_dicom_dir, train={"epochz": 3})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "train.epochz: unknown key" in str(err.value)


def test_wrong_type_is_named(tmp_path, breast_dicom_dir):
    path = write_config(tmp_path, breast_dicom_dir, train={"batch_size": "lots"})
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(path)


def test_missing_data_path_is_named(tmp_path, breast_dicom_dir):
    path = write_config(tmp_path, breast_dicom_dir)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["root"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data\.root: path does not exist"):
        load_config(path)


def test_positive_label_must_be_a_class(tmp_path, breast_dicom_dir):
    path = write_config(tmp_path, breast_dicom_dir, data={"positive_label": "cancer"})
    with pytest.raises(ConfigError, match=r"positive_label"):
        load_config(path)


def test_salt_from_env_else_a_private_random_file(monkeypatch, breast_config):
    monkeypatch.setenv("MEDXFER_PATIENT_SALT", "from-env")
    assert breast_config.patient_salt() == "from-env"
    monkeypatch.delenv("MEDXFER_PATIENT_SALT")
    first = breast_config.patient_salt()
    salt_file = breast_config.output_dir / ".patient_salt"
    assert len(first) == 64 and salt_file.stat().st_mode & 0o077 == 0
    assert breast_config.patient_salt() == first  # stable, so patient keys stay stable


def test_task_spec_names_outputs_and_the_positive_class_for_both_kinds():
    breast = load_config(CONFIG_DIR / "breast_ultrasound.yaml", check_paths=False).task_spec
    assert breast.label_names == ("benign", "malignant") and breast.num_outputs == 2
    assert breast.positive_index == 1 and breast.positive_label == "malignant"
    assert TaskSpec(kind="classification", label_names=("a", "b", "c")).positive_index == 2  # default: last
    ages = load_config(CONFIG_DIR / "chest_xray_age.yaml", check_paths=False).task_spec
    assert ages.num_outputs == 1 and ages.positive_index == 0 and not ages.classification
    with pytest.raises(ValueError, match="label_names: only used for classification"):
        TaskSpec(kind="regression", label_names=("a", "b"))
    with pytest.raises(ValueError, match="positive_label"):
        TaskSpec(kind="classification", label_names=("a", "b"), positive_label="c")


def test_pretrain_config_says_what_it_predicts_without_a_data_section():
    config = load_pretrain_config(CONFIG_DIR / "pretrain_pneumonia.yaml", check_paths=False)
    assert config.task_spec == TaskSpec(kind="classification", label_names=("normal", "pneumonia"))
    assert not hasattr(config, "data") and config.run_dir == config.output_dir / "pretrain_pneumonia"

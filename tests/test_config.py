import pytest
import yaml

from configs import CONFIG_DIR, ConfigError, TaskKind, load_config

from tests.conftest import write_config


@pytest.mark.parametrize("name", ["breast_ultrasound.yaml", "chest_xray_age.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(CONFIG_DIR / name, check_paths=False)
    assert config.registry.model_name


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

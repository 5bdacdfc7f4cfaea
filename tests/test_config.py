"""Config: presets, YAML round trip, key.sub=value overrides, job sections, validation."""

import subprocess
import sys

import pytest

from gap3d.build import derive_shapes
from gap3d.config import DERIVED_SHAPES, Gap3DConfig, load_config, load_job_config, save_config
from gap3d.presets import DEFAULT_PRESET, PRESETS
from ray_jobs.train import TRAIN_SECTIONS


def test_paper_preset_is_the_authors_recipe():
    config = load_config("paper")
    assert (config.aligner.hidden_size, config.aligner.depth, config.aligner.num_heads) == (1792, 24, 28)
    assert config.vlm.num_soft_tokens == 64
    assert (config.train.lr, config.train.min_lr, config.train.weight_decay) == (2.8e-4, 1e-5, 0.0)
    assert (config.flow.cond_dropout, config.flow.cfg_scale) == (0.1, 3.0)
    assert config.flow.loss_weights == {"patches": 0.4, "cls": 0.3, "registers": 0.3}
    assert config.aligner.null_condition == "zeros"


def test_no_preset_states_a_shape_the_encoders_determine():
    for preset in PRESETS:
        config = load_config(preset)
        assert all(getattr(config.aligner, name) is None for name in DERIVED_SHAPES), preset


def test_the_tiny_aligners_shapes_are_derived_from_its_encoders_and_dino_image_size():
    aligner = derive_shapes(load_config("tiny")).aligner
    assert (aligner.token_dim, aligner.grid_size, aligner.num_special_tokens) == (64, 112 // 14, 5)
    assert (aligner.cond_dim, aligner.num_cond_tokens) == (64, 8)


def test_a_shape_that_disagrees_with_the_encoders_fails_naming_the_key():
    with pytest.raises(ValueError, match=r"aligner.grid_size=7, but the encoders .* give 8; leave it unset"):
        derive_shapes(load_config("tiny", overrides=["aligner.grid_size=7"]))


def test_a_derived_config_round_trips_through_yaml_and_derives_again_unchanged(tmp_path):
    config = derive_shapes(load_config("tiny"))
    save_config(config, tmp_path / "config.yaml")
    assert derive_shapes(load_config(yaml_path=tmp_path / "config.yaml")) == config


def test_reading_a_config_imports_no_model_code_torch_or_pyarrow():
    heavy = "('torch', 'pyarrow', 'transformers', 'gap3d.aligner', 'gap3d.prompt_encoder', 'gap3d.dino')"
    code = (
        "import sys; from gap3d.config import load_config; load_config('paper'); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy} or m in {heavy}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_yaml_round_trip_gives_an_equal_config(tmp_path):
    config = load_config("tiny", overrides=["train.max_steps=7"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(yaml_path=tmp_path / "config.yaml") == config


def test_yaml_values_override_the_preset_and_command_line_overrides_the_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: tiny\ntrain:\n  lr: 0.01\n  max_steps: 5\n")
    config = load_config(yaml_path=tmp_path / "run.yaml", overrides=["train.max_steps=9"])
    assert (config.preset, config.train.lr, config.train.max_steps) == ("tiny", 0.01, 9)


def test_overrides_parse_yaml_values_and_coerce_to_the_field_type():
    config = load_config(
        "tiny",
        overrides=["train.lr=1e-4", "vlm.trainable=false", "flow.loss_weights={patches: 1, cls: 0, registers: 0}"],
    )
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.vlm.trainable is False
    assert config.flow.loss_weights == {"patches": 1, "cls": 0, "registers": 0}


def test_unknown_key_is_rejected_naming_it_and_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config key train\.lrr; valid keys here: .*\blr\b"):
        load_config("tiny", overrides=["train.lrr=1"])


def test_malformed_override_and_wrong_type_are_rejected():
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config("tiny", overrides=["train.lr"])
    with pytest.raises(ValueError, match="train.max_steps needs an integer"):
        load_config("tiny", overrides=["train.max_steps=many"])


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="tiny, paper"):
        load_config("huge")


def test_the_aligners_condition_length_follows_the_soft_token_count():
    assert derive_shapes(load_config("tiny", overrides=["vlm.num_soft_tokens=4"])).aligner.num_cond_tokens == 4


def test_one_default_preset_everywhere():
    assert DEFAULT_PRESET == "tiny"
    assert load_config() == load_config("tiny")
    assert load_job_config(sections=TRAIN_SECTIONS) == load_job_config("tiny", sections=TRAIN_SECTIONS)
    with pytest.raises(TypeError):
        Gap3DConfig()  # no second default hidden in the dataclass


def test_job_sections_resolve_from_their_own_presets_and_the_same_overrides(tmp_path):
    config, sections = load_job_config(
        "tiny", overrides=["scaling.num_workers=4", "encode.pool_max=3"], sections=TRAIN_SECTIONS
    )
    assert (sections["scaling"].num_workers, sections["scaling"].use_gpu, sections["encode"].pool_max) == (4, False, 3)
    assert load_job_config("paper", sections=TRAIN_SECTIONS)[1]["scaling"].use_gpu is True
    save_config(config, tmp_path / "job.yaml", sections)
    assert load_job_config(yaml_path=tmp_path / "job.yaml", sections=TRAIN_SECTIONS) == (config, sections)


def test_job_resources_are_not_keys_of_the_library_config():
    with pytest.raises(ValueError, match="unknown config key scaling"):
        load_config("tiny", overrides=["scaling.num_workers=2"])

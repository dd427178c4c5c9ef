"""The config: one field per setting, resolved for the backend in one place."""

import dataclasses

import pytest

from gpt_jax import config as config_lib
from gpt_jax.errors import UserError
from gpt_jax.model import GPTConfig


def test_the_model_fields_are_gptconfigs():
    # One source for each fact: config.model holds exactly GPTConfig's fields (the vocabulary
    # comes from the corpus), so GPTConfig(**config.model) never drops or invents one.
    fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    assert set(config_lib.base_config().model) == fields


@pytest.mark.parametrize("backend, dtype, kernels", [
    ("cpu", "float32", "cpu"), ("gpu", "bfloat16", "fused"), ("tpu", "bfloat16", "fused")])
def test_auto_is_resolved_once_per_backend(backend, dtype, kernels):
    config = config_lib.base_config()
    resolved = config_lib.resolve_backend_fields(config, backend)
    assert (resolved.model.dtype, resolved.model.kernels) == (dtype, kernels)
    assert (config.model.dtype, config.model.kernels) == ("auto", "auto")  # the caller's stays
    model_cfg = config_lib.model_config(config, 65, backend)
    assert (model_cfg.dtype, model_cfg.kernels, model_cfg.vocab_size) == (dtype, kernels, 65)


def test_explicit_choices_are_kept():
    config = config_lib.base_config()
    config.model.dtype, config.model.kernels = "float32", "reference"
    resolved = config_lib.resolve_backend_fields(config, "gpu")
    assert (resolved.model.dtype, resolved.model.kernels) == ("float32", "reference")


@pytest.mark.parametrize("field, value", [("kernels", "reference"), ("kernels", "fused"),
                                          ("attention", "einsum"), ("attention", "fused")])
def test_kernel_switches_validate(field, value):
    config = config_lib.base_config()
    config.model[field] = value
    config_lib.validate(config)


def test_an_unknown_kernel_set_is_one_line():
    config = config_lib.base_config()
    config.model.kernels = "triton"
    with pytest.raises(UserError, match=r"model.kernels='triton' is unknown: use one of auto, "
                                        r"reference, cpu, fused"):
        config_lib.validate(config)

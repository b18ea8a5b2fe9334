"""A whole GPT (every variant, both backends) survives copy.deepcopy, pickle and torch.save:
the copy computes the same logits and shares no parameter with the original."""

import copy
import io
import pickle

import pytest
import torch

from gpt_cases import tiny_model, variant_params


def _torch_save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("backend", ["mka", "torch"])
@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)),
                                   _torch_save_load], ids=["deepcopy", "pickle", "torch.save"])
def test_whole_model_copies(variant, backend, clone):
    model = tiny_model(variant, backend)
    idx = torch.randint(0, model.config.vocab_size, (2, 10))
    twin = clone(model)
    assert twin.config == model.config
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(model.parameters(), twin.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(twin(idx)[0], model(idx)[0], rtol=0, atol=0)

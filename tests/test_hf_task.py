"""Hugging Face models with LoRA adapters (HFTask): the plan names a base model on disk,
its hash covers the base's files, and only the federated tensors travel.

The base models are built here from a config (random init), written with
``save_pretrained`` and read back through the real ``from_pretrained(folder)``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedloom.core.errors import PlanError, TaskError, WorkspaceError
from fedloom.core.records import TrainSettings
from fedloom.plan import plan_covers, plan_hash, validate_plan
from fedloom.store.checkpoint import load_weights
from fedloom.tasks import ModelSource, SiteContext, SiteDatasets
from fedloom.tasks.loader import load_task
from fedloom.workspace import base_model_digest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from fedloom.tasks.hf_model import SITE_TENSORS  # noqa: E402
from fedloom.tasks.hf_parts import save_base_model  # noqa: E402
from fedloom.tasks.hf_task import HFTask  # noqa: E402

VOCAB = 24
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def tiny_llama(vocab: int = VOCAB, pad: int | None = None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=pad,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace holding a tiny causal LM saved with save_pretrained (models/tiny)."""
    ws = tmp_path_factory.mktemp("hf")
    save_base_model(tiny_llama(), ws / "models" / "tiny")
    return ws


def blocks(n: int, seed: int, length: int = 12) -> list[torch.Tensor]:
    """Token sequences with a pattern a model can learn (each token one above the last)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n,), generator=g)
    return [(s + torch.arange(length)) % VOCAB for s in starts]


def context(state_dir: Path | None = None, site: str = "site-01") -> SiteContext:
    return SiteContext(site, 0, 1, 7, state_dir=state_dir)


SETTINGS = TrainSettings(epochs=2, batch_size=8, lr=0.05)


def task_for(ws: Path, federated: str | tuple[str, ...] = "trainable", **kw: object) -> HFTask:
    task = HFTask("causal-lm", lora=kw.pop("lora", LORA), **kw)  # type: ignore[arg-type]
    task.use_model(ModelSource(ws / "models" / "tiny", federated))
    return task


# ------------------------------------------------------------ the plan


def test_the_plan_names_a_base_model_and_which_tensors_travel() -> None:
    plan = validate_plan({"model": {"base": "models/tiny", "federated": "trainable"}})
    assert plan.model.base == "models/tiny" and plan.model.federated == "trainable"
    patterns = validate_plan({"model": {"federated": ["*lora_*", "*.score.*"]}})
    assert patterns.model.federated == ("*lora_*", "*.score.*")
    with pytest.raises(PlanError, match="must be all, trainable or a list"):
        validate_plan({"model": {"federated": "adapters"}})
    with pytest.raises(PlanError, match="at least one"):
        validate_plan({"model": {"federated": []}})
    # a plan without the section hashes as before the section existed
    assert "model" not in json.loads(validate_plan({}).canonical_json())


def test_the_plan_hash_covers_every_file_of_the_base_model(base: Path, tmp_path: Path) -> None:
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(base, ws)
    (ws / "task.py").write_text("")
    plan = validate_plan({"model": {"base": "models/tiny"}})
    before = plan_hash(plan, ws)
    assert before != plan_hash(validate_plan({}), ws)
    weights = ws / "models" / "tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one byte of the weights
    weights.write_bytes(bytes(data))
    assert plan_hash(plan, ws) != before
    assert "the base model models/tiny" in plan_covers(plan, ws)

    (ws / "models" / "tiny" / "extra.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WorkspaceError, match="pickled weights"):
        plan_hash(plan, ws)
    with pytest.raises(WorkspaceError, match="does not exist"):
        plan_hash(validate_plan({"model": {"base": "models/none"}}), ws)


def test_a_task_that_loads_no_model_is_refused_a_model_section(tmp_path: Path) -> None:
    from fedloom import create_workspace

    ws = create_workspace(tmp_path / "digits", "digits")
    with pytest.raises(WorkspaceError, match="for a task that loads its model from disk"):
        load_task(ws, "task.py", ModelSource(None, "trainable"))


# ------------------------------------------------------------ the task


def test_only_the_adapter_travels_and_training_moves_it_not_the_base(base: Path) -> None:
    task = task_for(base)
    init = task.init_weights(0)
    assert init and all("lora_" in name for name in init)
    assert len(init) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(not a.any() for n, a in init.items() if "lora_B" in n)  # B starts at zero
    federated = sum(a.nbytes for a in init.values())
    assert task.model_bytes() > 10 * federated

    out = task.train(init, SiteDatasets(blocks(32, 1), blocks(8, 2)), SETTINGS, context())
    assert list(out.weights) == list(init) and out.num_samples == 32
    assert any(out.weights[n].any() for n in init if "lora_B" in n)
    # the frozen base is what the folder holds, after training too
    state = task.built().model.state_dict()
    saved = load_weights(base / "models" / "tiny" / "model.safetensors")
    some = "model.layers.0.self_attn.q_proj.weight"
    after = state[f"base_model.model.{some}".replace(".weight", ".base_layer.weight")]
    np.testing.assert_array_equal(after.numpy(), saved[some])


def test_training_lowers_the_perplexity_and_the_same_seed_gives_the_same_adapter(
    base: Path,
) -> None:
    task = task_for(base)
    init = task.init_weights(0)
    assert all(np.array_equal(init[n], a) for n, a in task.init_weights(0).items())
    assert any(not np.array_equal(init[n], a) for n, a in task.init_weights(1).items())
    val = blocks(16, 3)
    before = task.evaluate(init, val, context()).metrics
    assert set(before) == {"perplexity", "loss"}
    assert before["perplexity"] == pytest.approx(np.exp(before["loss"]))
    first = task.train(init, SiteDatasets(blocks(64, 1)), SETTINGS, context())
    again = task.train(init, SiteDatasets(blocks(64, 1)), SETTINGS, context())
    assert all(np.array_equal(first.weights[n], again.weights[n]) for n in init)
    after = task.evaluate(first.weights, val, context()).metrics
    assert after["perplexity"] < before["perplexity"]


def test_all_sends_the_whole_model_and_patterns_keep_the_rest_at_the_site(
    base: Path, tmp_path: Path
) -> None:
    whole = task_for(base, "all")
    assert len(whole.init_weights(0)) == len(whole.built().model.state_dict())

    # only the B matrices travel: the A matrices train, and stay at each site
    task = task_for(base, ("*lora_B*",))
    init = task.init_weights(0)
    assert init and all("lora_B" in n for n in init)
    a_name = next(n for n in task.built().model.state_dict() if "lora_A" in n)
    first_a = task.built().initial[a_name].clone()
    mine = tmp_path / "site-01"
    mine.mkdir()
    task.train(init, SiteDatasets(blocks(32, 1)), SETTINGS, context(mine))
    kept = load_weights(mine / SITE_TENSORS)
    assert a_name in kept and not np.array_equal(kept[a_name], first_a.numpy())
    # another site (another state folder) starts from the first A, not site-01's
    other = tmp_path / "site-02"
    other.mkdir()
    task.built().prepare(init, context(other, "site-02"))
    assert torch.equal(task.built().model.state_dict()[a_name], first_a)
    task.built().prepare(init, context(mine))
    np.testing.assert_array_equal(task.built().model.state_dict()[a_name].numpy(), kept[a_name])

    with pytest.raises(WorkspaceError, match="matches no tensor"):
        task_for(base, ("*nothing*",)).init_weights(0)


def test_a_classifier_with_an_adapter_federates_its_new_head(tmp_path: Path) -> None:
    save_base_model(tiny_llama(), tmp_path / "models" / "no-pad")
    unpadded = HFTask("sequence-classification", lora=LORA, num_labels=3)
    unpadded.use_model(ModelSource(tmp_path / "models" / "no-pad", "trainable"))
    with pytest.raises(WorkspaceError, match="no pad_token_id"):
        unpadded.init_weights(0)
    save_base_model(tiny_llama(pad=0), tmp_path / "models" / "tiny")
    task = HFTask("sequence-classification", lora=LORA, num_labels=3)
    task.use_model(ModelSource(tmp_path / "models" / "tiny", "trainable"))
    init = task.init_weights(0)
    assert any("score" in n for n in init)  # the new head trains, and travels
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(0, VOCAB, (10,), generator=g), i % 3) for i in range(24)]
    out = task.train(init, SiteDatasets(items), SETTINGS, context())
    metrics = task.evaluate(out.weights, items, context()).metrics
    assert set(metrics) == {"accuracy", "loss"} and 0 <= metrics["accuracy"] <= 1


def test_bad_settings_and_data_get_clear_errors(base: Path) -> None:
    with pytest.raises(WorkspaceError, match="kind must be one of"):
        HFTask("translation")
    with pytest.raises(WorkspaceError, match="needs num_labels"):
        HFTask("sequence-classification")
    unbound = HFTask("causal-lm", lora=LORA)
    with pytest.raises(WorkspaceError, match="the plan names none"):
        unbound.init_weights(0)
    task = task_for(base)
    init = task.init_weights(0)
    with pytest.raises(TaskError, match="below the model's vocab_size"):
        task.check_data(init, SiteDatasets([torch.arange(10) + VOCAB]), context())
    with pytest.raises(TaskError, match="HFTask takes token-id tensors"):
        task.train(init, SiteDatasets(["some text"]), SETTINGS, context())
    fewer = dict(list(init.items())[:-1])
    with pytest.raises(TaskError, match="federated tensors"):
        task.evaluate(fewer, blocks(4, 0), context())
    bad_lora = task_for(base, lora={**LORA, "target_modules": ["no_such_layer"]})
    with pytest.raises(WorkspaceError, match="does not fit the base model"):
        bad_lora.init_weights(0)


def test_bf16_base_and_adapter_weights_travel_in_their_dtype(tmp_path: Path) -> None:
    model = tiny_llama().to(torch.bfloat16)
    save_base_model(model, tmp_path / "models" / "tiny")
    task = HFTask("causal-lm", lora=None)
    task.use_model(ModelSource(tmp_path / "models" / "tiny", "*.layers.0.*"))
    init = task.init_weights(0)
    assert {str(a.dtype) for a in init.values()} == {"bfloat16"}
    out = task.train(init, SiteDatasets(blocks(16, 1)), dataclasses.replace(SETTINGS), context())
    assert {str(a.dtype) for a in out.weights.values()} == {"bfloat16"}
    assert base_model_digest(tmp_path / "models" / "tiny")  # a folder of bf16 safetensors

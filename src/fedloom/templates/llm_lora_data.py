"""The ``llm-lora`` template's files: a tiny causal language model written with
``save_pretrained`` (the base every site starts from, ``models/tiny-lm``) and each
hospital's clinical notes as text (``data/<site>/notes.txt``, ``data/test/notes.txt``).

Nothing is downloaded. The base is a small Llama-shaped model built from a config and
given a short character-level pretraining on generic English (the sentences below), so
it knows letters, spaces and punctuation but none of the hospitals' notes. Each
hospital's notes come from its own department (cardiology, oncology, paediatrics,
orthopaedics): the sites hold different text, as real sites do. The files are the same
at every ``fedloom init``: everything is drawn from the plan's seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedloom.core.errors import WorkspaceError
from fedloom.core.rng import generator
from fedloom.plan import load_plan

BASE = "models/tiny-lm"
NOTES_PER_SITE = 300
TEST_NOTES_PER_DEPARTMENT = 40
PRETRAIN_STEPS = 40

# A character vocabulary: the printable ASCII characters and the newline (task.py
# holds the same table).
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))

DEPARTMENTS: dict[str, dict[str, list[str]]] = {
    "cardiology": {
        "complaint": [
            "chest pain radiating to the left arm",
            "shortness of breath on exertion",
            "palpitations since last night",
            "syncope while walking",
        ],
        "finding": [
            "ECG shows ST elevation in leads II, III and aVF",
            "troponin raised at 0.{n} ng/mL",
            "echo shows an ejection fraction of {p}%",
            "blood pressure {s}/{d} mmHg, irregular pulse",
        ],
        "plan": [
            "started aspirin and heparin, cath lab booked",
            "beta blocker increased, review in clinic",
            "admitted to the coronary care unit",
            "anticoagulation started, holter monitor fitted",
        ],
    },
    "oncology": {
        "complaint": [
            "weight loss of {w} kg over two months",
            "new lump in the right breast",
            "persistent cough and night sweats",
            "fatigue after cycle {c} of chemotherapy",
        ],
        "finding": [
            "biopsy confirms adenocarcinoma, grade {c}",
            "CT shows a {w} cm mass in the upper lobe",
            "neutrophils low at {c}.{n} x10^9/L",
            "tumour markers falling since the last cycle",
        ],
        "plan": [
            "cycle {c} of chemotherapy deferred one week",
            "referred to the tumour board on Monday",
            "radiotherapy planning scan booked",
            "started antiemetics and growth factor support",
        ],
    },
    "paediatrics": {
        "complaint": [
            "fever for {c} days and poor feeding",
            "barking cough worse at night",
            "rash on the trunk since yesterday",
            "vomiting and diarrhoea, {c} wet nappies today",
        ],
        "finding": [
            "weight {w} kg, temperature 38.{n} C",
            "mild dehydration, capillary refill under 2 s",
            "ears red and bulging on the left",
            "chest clear, saturations {p}% in air",
        ],
        "plan": [
            "oral fluids trial, parents reassured",
            "paracetamol and ibuprofen, review in 48 h",
            "single dose of dexamethasone given",
            "admitted for observation overnight",
        ],
    },
    "orthopaedics": {
        "complaint": [
            "fall onto an outstretched hand",
            "knee swelling after football",
            "low back pain for {c} weeks",
            "hip pain and unable to bear weight",
        ],
        "finding": [
            "x-ray shows a displaced fracture of the distal radius",
            "MRI shows a tear of the medial meniscus",
            "reduced range of movement, no neurological deficit",
            "shortened and externally rotated left leg",
        ],
        "plan": [
            "closed reduction and cast applied",
            "listed for arthroscopy in {c} weeks",
            "physiotherapy referral and analgesia",
            "listed for hemiarthroplasty tomorrow",
        ],
    },
}

GENERIC = [
    "The morning was cold and the river ran fast under the old stone bridge.",
    "She wrote a short letter to her brother and posted it before noon.",
    "Most of the shops in the town close early on a Sunday.",
    "The committee will meet again in March to review the budget.",
    "He walked to the station, bought a ticket and waited for the train.",
    "Rain is expected in the north, with sunny spells in the south.",
    "The library holds more than twelve thousand books and maps.",
    "They planted apple trees along the edge of the field last spring.",
]


def prepare(workspace: Path) -> str:
    """Write the base model and the notes; say what was written."""
    plan = load_plan(workspace)
    root = workspace / (plan.data.path or "data")
    names = list(DEPARTMENTS)
    counts = {}
    for i, site in enumerate(plan.roster):
        department = site if site in DEPARTMENTS else names[i % len(names)]
        rng = generator(plan.seed, 0, site, "llm-lora notes")
        notes = [note(department, rng) for _ in range(NOTES_PER_SITE)]
        counts[site] = department
        _write(root / site / "notes.txt", notes)
    rng = generator(plan.seed, 0, "", "llm-lora test notes")
    test = [note(d, rng) for d in names for _ in range(TEST_NOTES_PER_DEPARTMENT)]
    _write(root / "test" / "notes.txt", [test[i] for i in rng.permutation(len(test))])
    write_base_model(workspace / BASE, plan.seed)
    shown = ", ".join(f"{site}: {d}" for site, d in counts.items())
    return f"wrote the base model {BASE} and the clinical notes under {root.name}/ ({shown})"


def note(department: str, rng: np.random.Generator) -> str:
    """One clinical note of ``department``: complaint, finding, plan."""
    parts = DEPARTMENTS[department]
    values = {
        "n": int(rng.integers(1, 10)),
        "p": int(rng.integers(30, 99)),
        "s": int(rng.integers(95, 190)),
        "d": int(rng.integers(50, 110)),
        "w": int(rng.integers(2, 30)),
        "c": int(rng.integers(2, 7)),
    }
    age, sex = int(rng.integers(1, 95)), "MF"[int(rng.integers(0, 2))]
    chosen = [str(rng.choice(parts[k])).format(**values) for k in ("complaint", "finding", "plan")]
    return f"{department.title()}: {age}{sex}, {chosen[0]}. {chosen[1]}. {chosen[2]}."


def _write(path: Path, notes: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(notes) + "\n", encoding="utf-8")


def write_base_model(folder: Path, seed: int) -> None:
    """Build the tiny base model from a config, pretrain it briefly on generic English
    (characters), and ``save_pretrained`` it into ``folder``."""
    try:
        import torch
        import transformers  # noqa: F401 - here only to say what is missing
    except ImportError as err:
        raise WorkspaceError(
            f"the llm-lora template needs transformers and peft: {err}",
            hint="pip install 'fedloom[hf]'",
        ) from err
    from fedloom.tasks.hf_parts import quiet_transformers

    quiet_transformers()
    threads = torch.get_num_threads()
    # one thread: the model is small, and several threads spin against whatever else
    # runs on the machine (two inits side by side took minutes instead of seconds)
    torch.set_num_threads(1)
    try:
        _pretrain_and_save(folder, seed)
    finally:
        torch.set_num_threads(threads)


def _pretrain_and_save(folder: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedloom.tasks.hf_parts import save_base_model

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(ALPHABET),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    text = " ".join(GENERIC)
    ids = torch.tensor([ALPHABET.index(c) for c in text if c in ALPHABET])
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(PRETRAIN_STEPS):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=rng)
        batch = torch.stack([ids[s : s + 64] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    save_base_model(model, folder)

"""The ``cohort`` template's data: a synthetic patient table per hospital, written as
``data/<site>/patients.csv`` (age, sex, bmi, systolic_bp, hba1c, diabetes), with a few
values missing as in real registries. The hospitals differ in size and case mix (one is a
geriatric centre, one a small paediatric-to-adult clinic), and the tables are the same at
every ``fedloom init``: they are drawn from a generator seeded by the plan."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedloom.core.rng import generator
from fedloom.plan import load_plan

COLUMNS = ("age", "sex", "bmi", "systolic_bp", "hba1c", "diabetes")
# per site: patients, mean age, its spread
SITES = ((420, 52.0, 15.0), (260, 71.0, 9.0), (610, 47.0, 17.0), (90, 36.0, 12.0))
MISSING = 0.03  # the share of bmi and hba1c values not recorded


def prepare(workspace: Path) -> str:
    """Write each site's patients.csv under the plan's data.path; say what was written."""
    plan = load_plan(workspace)
    root = workspace / (plan.data.path or "data")
    total = 0
    for (n, age_mean, age_sd), site in zip(SITES, plan.roster, strict=False):
        rng = generator(plan.seed, 0, site, "cohort")
        age = np.clip(rng.normal(age_mean, age_sd, n), 18, 99)
        sex = rng.integers(0, 2, n)
        bmi = np.clip(rng.normal(24 + 0.06 * age, 4.5), 15, 55)
        risk = 1 / (1 + np.exp(-(-5.6 + 0.06 * age + 0.12 * (bmi - 25))))
        diabetes = (rng.random(n) < risk).astype(int)
        hba1c = np.clip(rng.normal(5.4 + 1.9 * diabetes, 0.5 + 0.9 * diabetes), 4, 14.5)
        systolic = np.clip(rng.normal(105 + 0.45 * age + 0.5 * (bmi - 25), 14), 80, 220)
        folder = root / site
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "patients.csv").open("w", newline="") as out:
            rows = csv.writer(out)
            rows.writerow(COLUMNS)
            for i in range(n):
                rows.writerow(
                    [
                        f"{age[i]:.0f}",
                        int(sex[i]),
                        "" if rng.random() < MISSING else f"{bmi[i]:.1f}",
                        f"{systolic[i]:.0f}",
                        "" if rng.random() < MISSING else f"{hba1c[i]:.1f}",
                        int(diabetes[i]),
                    ]
                )
        total += n
    return f"wrote {total} synthetic patients' tables under {root}/<site>/patients.csv"

"""Population-based training end to end: a worker trains a fused PBT group and the lineage shows
through REST (trial user attributes); the best trial's checkpoint downloads as usual."""

from __future__ import annotations

import io
import json

import httpx
import pytest
import torch

from caviar.service import store
from caviar.service.db import Database
from tests.worker.conftest import digits_study, run_slot_in_thread

pytestmark = pytest.mark.slow


def test_a_pbt_study_records_its_lineage_and_its_best_checkpoint_downloads(db: Database, live: str) -> None:
    body = digits_study("pbt", n_trials=4, max_epochs=4, fuse=4)
    body["sampler"] = {"type": "random", "seed": 3}
    body["search_space"]["lr"] = {"type": "float", "low": 1e-5, "high": 3e-2, "scale": "log"}
    del body["search_space"]["optimizer"], body["search_space"]["momentum"]  # Adam (the default)
    body["pruner"] = {
        "type": "pbt",
        "options": {
            "interval": 2,
            "quantile": 0.5,
            "resample_probability": 0.0,
            "perturb": {"params": ["lr"]},
        },
    }
    store.create_study(db, store.parse_definition(body))
    run_slot_in_thread(live, 120, fuse=4)

    listed = httpx.get(f"{live}/api/v1/studies/pbt/trials").json()
    items = listed["items"] if isinstance(listed, dict) else listed
    assert sorted(t["state"] for t in items) == ["complete"] * 4
    numbers = {t["number"] for t in items}
    exploited = [t for t in items if "pbt_parent" in t["user_attrs"]]
    assert len(exploited) == 2  # the bottom half of the group copied from the top half at epoch 2
    for listed_trial in exploited:
        trial = httpx.get(f"{live}/api/v1/studies/pbt/trials/{listed_trial['number']}").json()
        attrs = trial["user_attrs"]
        assert attrs["pbt_parent"] in numbers - {trial["number"]}
        assert attrs["pbt_step"] == 2 and attrs["pbt_exploits"] == 1
        entry = json.loads(attrs["pbt_1"])
        assert entry["parent"] == attrs["pbt_parent"] and entry["step"] == 2
        assert entry["parent_score"] > entry["score"]
        assert entry["old"]["lr"] == pytest.approx(trial["params"]["lr"], rel=1e-5)  # its own sampled lr
        parent_lr = next(t["params"]["lr"] for t in items if t["number"] == entry["parent"])
        assert entry["new"]["lr"] / parent_lr in (pytest.approx(0.8, rel=1e-4), pytest.approx(1.2, rel=1e-4))
        assert json.loads(attrs["pbt_params"]) == entry["new"]
    untouched = [t for t in items if "pbt_parent" not in t["user_attrs"]]
    assert all(not any(k.startswith("pbt_") for k in t["user_attrs"]) for t in untouched)

    response = httpx.get(f"{live}/api/v1/studies/pbt/checkpoint")
    assert response.status_code == 200
    checkpoint = torch.load(io.BytesIO(response.content), weights_only=False)
    assert checkpoint  # the best trial's weights, as for any trainer study

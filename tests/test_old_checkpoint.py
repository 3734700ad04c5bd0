"""A checkpoint written by an earlier version of the model code (tests/data/checkpoint_v1, made by
tests/data/make_checkpoint_v1.py at commit 4388e5c) still restores, evaluates to the same
numbers and resumes training: refactors of the model keep its parameter and state trees."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest

import ctx
from ctx import evaluate, train
from ctx.restore import restore_for_inference
from ctx.sharding import make_mesh
from tests.data.make_checkpoint_v1 import OUT, config
from tests.helpers import ROOT, read_metrics, resolved

FIXTURE = os.path.join(ROOT, OUT)


def test_old_checkpoint_has_the_parameter_tree_of_todays_model():
    cfg = config()
    restored = restore_for_inference(
        cfg, FIXTURE, None, make_mesh(cfg.mesh, jax.devices()[:1]), resolved(cfg)
    )
    model_cfg = ctx.ModelConfig.from_config(cfg.model)
    model = ctx.CompressiveTransformer(model_cfg)
    fresh = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            jnp.zeros((1, model_cfg.segment_length), jnp.int32),
            ctx.init_memory(model_cfg, 1),
        )["params"]
    )

    def shapes(tree):
        return {
            jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)
        }

    assert shapes(restored.params) == shapes(fresh)
    assert restored.step == 4


def test_old_checkpoint_evaluates_to_the_numbers_it_had():
    with open(os.path.join(FIXTURE, "evaluation.json")) as f:
        then = json.load(f)
    now = evaluate.evaluate_checkpoint(config(), FIXTURE, "validation")
    assert now["tokens"] == then["tokens"] and now["documents"] == then["documents"]
    assert now["total_nll"] == pytest.approx(then["total_nll"], rel=1e-5)
    for doc_now, doc_then in zip(now["per_document"], then["per_document"]):
        assert doc_now["id"] == doc_then["id"]
        assert doc_now["nll"] == pytest.approx(doc_then["nll"], rel=1e-5)


def test_old_checkpoint_resumes_training(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(FIXTURE, workdir)
    cfg = config()
    cfg.train.num_steps = 8
    train.train_and_evaluate(cfg, str(workdir))
    steps = [m["step"] for m in read_metrics(workdir) if "loss" in m]
    assert steps and min(steps) > 4, steps  # continued from step 4, did not start over
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())[-1] == 8

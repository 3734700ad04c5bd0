"""Each corpus named in the JSON argv[1] ({name: data config fields}) loaded twice, from its
`path` (and `tokenizer`) and from `local_path` (and `local_tokenizer`), with enwik8's splits
scaled to its test file; prints {name: {"documents", "tokens", "same"}} as JSON."""

import hashlib
import json
import sys

import numpy as np

from ctx.config import default_config
from ctx.data import datasets
from ctx.data.datasets import load_corpus

datasets.ENWIK8_SPLITS = {"train": (0, 900), "validation": (900, 950), "test": (950, 1000)}


def summary(fields, split):
    cfg = default_config().data
    cfg.update(fields)
    corpus = load_corpus(cfg, split)
    return corpus.ids, hashlib.sha256(np.asarray(corpus.flat).tobytes()).hexdigest()


results = {}
for name, spec in json.loads(sys.argv[1]).items():
    split = spec.pop("split")
    local = {**spec, "path": spec.pop("local_path"), "tokenizer": spec.pop("local_tokenizer")}
    local["cache_dir"] = spec["cache_dir"] + "-local"
    remote, mirror = summary(spec, split), summary(local, split)
    results[name] = {"documents": len(remote[0]), "tokens": remote[1], "same": remote == mirror}
print(json.dumps(results))

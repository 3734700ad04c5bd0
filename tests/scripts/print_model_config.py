"""The model section the commands build from --config=... and its overrides, as one line:
`repr(attention_dropout) ModelConfig(...)`.

    python tests/scripts/print_model_config.py --config=experiments/pg19.py [--config.model.x=y ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app  # noqa: E402 - after the repository root is on the path

from ctx.cli import FLAGS, define_config_flags  # noqa: E402
from ctx.config import ModelConfig  # noqa: E402

define_config_flags()
app.run(
    lambda argv: print(
        repr(FLAGS.config.model.attention_dropout), ModelConfig.from_config(FLAGS.config.model)
    )
)

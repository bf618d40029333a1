"""The base of every params.yaml section, and the shape of a name.

Every section class derives from `Section`: unknown keys fail, values are frozen, and each field's
docstring becomes its pydantic description, the meaning docs/configuration.md gives (lmline.configdoc).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

SLUG = r"^[a-z0-9][a-z0-9_-]*$"  # project and source names: they end up in file, model and metric names


class Section(BaseModel):
    # extra="forbid": a typo in params.yaml must fail loudly, not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

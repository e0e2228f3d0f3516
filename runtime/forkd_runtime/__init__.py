"""forkd's fork engines: templates, backends (process, vm), snapshots, pools, BRANCH."""

from ._state import state_dir
from ._templates import Template, TemplateError, TemplateSpec, TemplateStore, load_spec

__all__ = ["Template", "TemplateError", "TemplateSpec", "TemplateStore", "load_spec", "state_dir"]

"""Built-in procedural table-top task suite (see tabletop.py for conventions)."""
from .expert import expert_action
from .perturb import MAGNITUDES as PERTURBATION_MAGNITUDES
from .perturb import PERTURBATIONS
from .tabletop import PROPRIO_DIM, PROPRIO_LAYOUT, TableTopEnv, random_episodes
from .tasks import SUITES, TASKS
from .viz import render_strip

__all__ = ["TableTopEnv", "random_episodes", "expert_action", "render_strip", "TASKS", "SUITES",
           "PERTURBATIONS", "PERTURBATION_MAGNITUDES", "PROPRIO_DIM", "PROPRIO_LAYOUT"]

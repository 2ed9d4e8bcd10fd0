"""The planner: a hardware profile (measured by `fuyou probe` or written by hand), a cost model that
prices a placement on it, and a planner that picks the placement, swapping and batch.

Modules: hardware (HardwareProfile, YAML), probe (measures one), policy (the frozen Plan),
cost_model (Plan x hardware -> Prediction), planner (choose a Plan or say what is short).
"""

from fuyou.plan.cost_model import Prediction, predict
from fuyou.plan.hardware import HardwareProfile
from fuyou.plan.policy import Plan

__all__ = ["HardwareProfile", "Plan", "Prediction", "predict"]

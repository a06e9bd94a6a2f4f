"""What both wirings share: the site executor (a task's train and evaluate on a site's
data), the devices it runs on, a site's data, the federation's settings from the plan,
and how a task's failure is told. The simulation (:mod:`fedloom.simulation`) and the
deployment (:mod:`fedloom.deployment`) build on it."""

//! Load-test harness: coordinator and workers speaking the real protocol. Built in the load-test step.

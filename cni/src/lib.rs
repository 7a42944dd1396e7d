//! Sepal's CNI plugin library: the CNI protocol side (config, results, errors) and the
//! plugin <-> agent socket protocol (`api`), shared with the agent.

pub mod api;

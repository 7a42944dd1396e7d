//! Sepal's CNI plugin library: the CNI protocol side (config, environment, results, errors,
//! version negotiation), the rtnetlink plumbing, and the plugin <-> agent socket protocol (`api`).

pub mod api;
pub mod client;
pub mod config;
pub mod env;
pub mod error;
pub mod netlink;
pub mod plugin;
pub mod plumbing;
pub mod port_mappings;
pub mod result;
pub mod testing;
pub mod version;

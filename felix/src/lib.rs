//! Sepal dataplane.

//! Sepal BGP speaker.

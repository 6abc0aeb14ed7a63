//! Shared test support. Each integration test file includes this with
//! `mod common;` and uses what it needs, so unused items are expected.
#![allow(dead_code)]
// Test support panics with a message on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod azurite;
pub mod backend;
pub mod consume;
pub mod proxy;
pub mod queues;
pub mod receiver;
pub mod standard_webhooks;
pub mod worker;

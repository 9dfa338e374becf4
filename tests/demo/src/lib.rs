//! The quickstart demo's sample data, shared with the end-to-end tests (`understudy-e2e`).

pub mod sample;

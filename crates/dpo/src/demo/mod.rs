pub mod experiment;
pub mod world;

//! twin's `mine` stage (CLIP embeddings, nearest neighbours from other instances, filter
//! modules: candidate hard negatives) and the embeddings blob it writes and reuses.

pub mod embeddings;
mod mine;

pub use embeddings::EmbeddingTable;
pub use mine::MineStage;

//! Models: BaseModel, DIN, DIEN, GRU4Rec.

//! Neural-network layers, one file per layer, each stating its formula.

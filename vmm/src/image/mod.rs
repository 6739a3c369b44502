//! Container images as build environments (being written).

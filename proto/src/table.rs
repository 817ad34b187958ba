//! Rules on a table's settings that both the job configuration (before a run
//! starts) and the shards (on `CreateTable`) enforce, with one message each.

use crate::v1::CountMode;

/// An invalid combination of MBA regularisation and count mode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MbaError {
    /// `mba_lambda` is negative, NaN or infinite.
    #[error("mba_lambda = {0} must be a finite value >= 0")]
    BadLambda(f32),
    /// MBA scales each row's L2 term by `1 / n_j`, its id's count, so it
    /// needs the shard to keep counts.
    #[error("mba_lambda > 0 needs counts: count_mode exact or online, not none")]
    NeedsCounts,
}

/// Checks `mba_lambda` and its combination with `count_mode`: the lambda is
/// finite and `>= 0`, and a positive lambda needs a count mode other than
/// [`CountMode::CountNone`].
pub fn check_mba(mba_lambda: f32, count_mode: CountMode) -> Result<(), MbaError> {
    if !mba_lambda.is_finite() || mba_lambda < 0.0 {
        return Err(MbaError::BadLambda(mba_lambda));
    }
    if mba_lambda > 0.0 && count_mode == CountMode::CountNone {
        return Err(MbaError::NeedsCounts);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mba_needs_counts_and_a_finite_lambda() {
        for m in [
            CountMode::CountNone,
            CountMode::CountExact,
            CountMode::CountOnline,
        ] {
            assert_eq!(check_mba(0.0, m), Ok(()));
        }
        assert_eq!(check_mba(0.01, CountMode::CountExact), Ok(()));
        assert_eq!(check_mba(0.01, CountMode::CountOnline), Ok(()));
        assert_eq!(
            check_mba(0.01, CountMode::CountNone),
            Err(MbaError::NeedsCounts)
        );
        for bad in [-0.1, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                check_mba(bad, CountMode::CountExact),
                Err(MbaError::BadLambda(_))
            ));
        }
        let msg = MbaError::NeedsCounts.to_string();
        assert!(
            msg.contains("mba_lambda") && msg.contains("count_mode"),
            "{msg}"
        );
    }
}

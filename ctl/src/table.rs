//! Plain aligned tables for humans; `-o json` is for scripts. Every cell is shown with its control
//! characters escaped (`tapgraph::text`): a hostname or process name an agent sent cannot add a
//! row, move the cursor or clear the screen. JSON keeps the values verbatim.

use tapgraph::text::escape;

/// Prints `rows` under `headers`, each column as wide as its widest cell.
pub fn print(headers: &[&str], rows: &[Vec<String>]) {
    for line in render(headers, rows) {
        println!("{line}");
    }
}

/// Prints `key value` lines, the values lined up: one record, as `agent show` prints it.
pub fn fields<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) {
    let width = pairs
        .iter()
        .map(|(k, _)| k.as_ref().chars().count())
        .max()
        .unwrap_or(0)
        .max(20);
    for (k, v) in pairs {
        println!("{:<width$} {}", escape(k.as_ref()), escape(v.as_ref()));
    }
}

/// The lines of the table, its cells escaped.
pub(crate) fn render(headers: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| escape(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let mut lines = vec![line(headers.to_vec())];
    for row in &rows {
        lines.push(line(row.iter().map(String::as_str).collect()));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_cell_stays_in_its_row() {
        let rows = [
            vec!["a".to_string(), "web\x1b[2J\nforged-row\0".to_string()],
            vec!["b".to_string(), "db".to_string()],
        ];
        let lines = render(&["ID", "HOSTNAME"], &rows);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "a   web\\x1b[2J\\nforged-row\\0");
        assert!(lines.iter().all(|l| !l.contains(tapgraph::text::is_unsafe)));
    }
}

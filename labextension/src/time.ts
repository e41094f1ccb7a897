/**
 * Pure helpers: the notice's times as the user reads them (their own local time zone).
 */

export interface IReaperNotice {
  id: string;
  kind: 'warning' | 'reminder' | 'final' | 'walltime';
  stop_at: string | null;
  walltime_end: string | null;
  reason: string;
  hub: string;
  server: string;
}

/** What the countdown counts down to: the scheduled stop, or the job's walltime end when earlier. */
export interface IDeadline {
  at: Date;
  what: 'stop' | 'walltime';
}

export function deadline(notice: IReaperNotice): IDeadline | null {
  const stop = notice.stop_at ? new Date(notice.stop_at) : null;
  const wall = notice.walltime_end ? new Date(notice.walltime_end) : null;
  if (stop && !isNaN(stop.getTime()) && (!wall || isNaN(wall.getTime()) || stop <= wall)) {
    return { at: stop, what: 'stop' };
  }
  if (wall && !isNaN(wall.getTime())) {
    return { at: wall, what: 'walltime' };
  }
  return null;
}

/** "17:25", or "Tue 17:25" when not today (local time, the browser's locale). */
export function localTime(t: Date, now: Date = new Date()): string {
  const hm = t.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (t.toDateString() === now.toDateString()) {
    return hm;
  }
  return `${t.toLocaleDateString([], { weekday: 'short', day: 'numeric', month: 'short' })} ${hm}`;
}

/** "in 42 min", "in 2 h 05 min", "in 40 s", "now". */
export function relative(t: Date, now: Date = new Date()): string {
  const s = Math.round((t.getTime() - now.getTime()) / 1000);
  if (s <= 0) {
    return 'now';
  }
  if (s < 60) {
    return `in ${s} s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `in ${m} min`;
  }
  const h = Math.floor(m / 60);
  return `in ${h} h ${String(m % 60).padStart(2, '0')} min`;
}

/** The notification's text (JupyterLab cuts messages at 140 characters: the essentials first). */
export function message(notice: IReaperNotice, now: Date = new Date()): string {
  const d = deadline(notice);
  const name = notice.server ? `Your server ${notice.server}` : 'This server';
  const where = notice.hub ? ` on ${notice.hub}` : '';
  let text: string;
  if (d && d.what === 'walltime') {
    text = `${name}${where} ends at ${localTime(d.at, now)} (${relative(d.at, now)}): the job's walltime.`;
  } else if (d) {
    text = `${name}${where} will be stopped at ${localTime(d.at, now)} (${relative(d.at, now)}).`;
  } else {
    text = `${name}${where} may be stopped soon.`;
  }
  if (notice.reason) {
    text += ` ${notice.reason[0].toUpperCase()}${notice.reason.slice(1)}.`;
  }
  return text.length > 140 ? text.slice(0, 139) + '…' : text;
}

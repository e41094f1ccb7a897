/**
 * jupyterhub-reaper in JupyterLab: the reaper's pending notice for this server, where the user is.
 *
 * Polls the companion's GET api/reaper/notice?no_track_activity=1 (never counted as activity), and
 * not at all while the tab is hidden: a forgotten background tab must still become idle. A pending
 * notice shows as a Notification that stays until dismissed, with "Keep running" (POST
 * api/reaper/keep: the one request that counts as activity) and "Stop now" (after a confirm: POST
 * api/reaper/stop, which asks the hub to stop this server). A status-bar item counts down to the
 * scheduled stop, or to the job's walltime end when that comes first.
 */

import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Dialog, Notification, showDialog } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import { IReaperNotice, deadline, localTime, message, relative } from './time';

const POLL_MS = 10_000;
const NOTICE_PATH = 'api/reaper/notice';

interface INoticeView {
  notice: IReaperNotice | null;
  kept_at: string | null;
  can_stop: boolean | null;
}

async function call(path: string, method: string, track = false): Promise<Response> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, path) + (track ? '' : '?no_track_activity=1');
  return ServerConnection.makeRequest(url, { method }, settings);
}

async function messageOf(resp: Response, otherwise: string): Promise<string> {
  try {
    const body = await resp.json();
    return (body && (body.message as string)) || otherwise;
  } catch {
    return otherwise;
  }
}

/** The status-bar countdown. */
class Countdown extends Widget {
  constructor() {
    super();
    this.addClass('jp-reaper-countdown');
    this.hide();
    this._timer = window.setInterval(() => this.render(), 1000);
  }

  set notice(value: IReaperNotice | null) {
    this._notice = value;
    this.render();
  }

  render(): void {
    const d = this._notice ? deadline(this._notice) : null;
    if (!d) {
      this.node.textContent = '';
      this.node.removeAttribute('data-deadline');
      this.hide();
      return;
    }
    const now = new Date();
    const words = d.what === 'walltime' ? 'Job ends' : 'Stops';
    this.node.textContent = `${words} ${relative(d.at, now)} (${localTime(d.at, now)})`;
    this.node.title =
      d.what === 'walltime'
        ? `This server's batch job reaches its walltime at ${d.at.toLocaleString()}`
        : `The reaper will stop this idle server at ${d.at.toLocaleString()} unless you keep it running`;
    this.node.dataset.deadline = d.what;
    this.node.dataset.at = d.at.toISOString();
    this.toggleClass('jp-reaper-soon', d.at.getTime() - now.getTime() < 15 * 60_000);
    this.show();
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  private _notice: IReaperNotice | null = null;
  private _timer: number;
}

class NoticeWatcher {
  constructor(private countdown: Countdown) {}

  start(): void {
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') {
        void this.poll();
      } else {
        this.pause();
      }
    });
    if (document.visibilityState === 'visible') {
      void this.poll();
    }
  }

  private pause(): void {
    if (this._timer !== null) {
      window.clearTimeout(this._timer);
      this._timer = null;
    }
  }

  private schedule(): void {
    this.pause();
    if (document.visibilityState === 'visible') {
      this._timer = window.setTimeout(() => void this.poll(), POLL_MS);
    }
  }

  async poll(): Promise<void> {
    if (document.visibilityState !== 'visible') {
      return; // hidden: no request at all
    }
    try {
      const resp = await call(NOTICE_PATH, 'GET');
      if (resp.status === 404) {
        return; // no companion on this server: nothing to show, ask no more
      }
      if (resp.ok) {
        this.show(((await resp.json()) as INoticeView).notice);
      }
    } catch (e) {
      console.debug('jupyterhub-reaper: notice poll failed', e);
    }
    this.schedule();
  }

  private show(notice: IReaperNotice | null): void {
    this.countdown.notice = notice;
    if (!notice) {
      this.dismiss();
      this._shown = null;
      return;
    }
    if (this._shown === notice.id) {
      return; // already shown (or dismissed by the user): not again
    }
    this.dismiss();
    this._shown = notice.id;
    const type = notice.kind === 'final' || notice.kind === 'walltime' ? 'warning' : 'info';
    this._toast = Notification.emit(message(notice), type, {
      autoClose: false, // stays until dismissed (autoClose: 0 would file it silently in the centre)
      actions: [
        {
          label: 'Keep running',
          caption: 'I am here: keep this server running',
          displayType: 'accent',
          callback: () => void this.keep()
        },
        {
          label: 'Stop now',
          caption: 'Stop this server now (after a confirm)',
          displayType: 'warn',
          callback: () => void this.stop()
        }
      ]
    });
  }

  private dismiss(): void {
    if (this._toast !== null) {
      Notification.dismiss(this._toast);
      this._toast = null;
    }
  }

  private async keep(): Promise<void> {
    this._toast = null;
    try {
      const resp = await call('api/reaper/keep', 'POST', true);
      if (!resp.ok) {
        throw new Error(await messageOf(resp, `HTTP ${resp.status}`));
      }
      this.countdown.notice = null;
      Notification.success('Kept running: the reaper will see you are here.', { autoClose: 6000 });
    } catch (e) {
      Notification.error(`Could not keep this server running: ${e}`, { autoClose: false });
    }
  }

  private async stop(): Promise<void> {
    this._toast = null;
    const answer = await showDialog({
      title: 'Stop this server now?',
      body: 'Unsaved work in open notebooks is lost and running kernels are ended.',
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Stop now' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      const resp = await call('api/reaper/stop', 'POST');
      if (resp.status === 202) {
        this.countdown.notice = null;
        Notification.info('Stopping this server through the hub…', { autoClose: false });
        return;
      }
      const why = await messageOf(resp, `HTTP ${resp.status}`);
      Notification.error(`Could not stop this server from here: ${why}`, { autoClose: false });
    } catch (e) {
      Notification.error(`Could not stop this server from here: ${e}`, { autoClose: false });
    }
  }

  private _timer: number | null = null;
  private _shown: string | null = null;
  private _toast: string | null = null;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyterhub-reaper:notice',
  description: "The reaper's pending notice for this server, Keep running / Stop now, and a countdown",
  autoStart: true,
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    const countdown = new Countdown();
    countdown.id = 'jupyterhub-reaper-countdown';
    if (statusBar) {
      statusBar.registerStatusItem('jupyterhub-reaper:countdown', { item: countdown, align: 'left', rank: 1000 });
    }
    new NoticeWatcher(countdown).start();
  }
};

export default plugin;
